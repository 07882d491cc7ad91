"""torchrun support: process-group set-up and the few collectives training needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def all_gather_objects(obj, ctx: DistContext) -> list:
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def sync_buffers(model: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank: each rank updates its
    own during the forward passes of an epoch, and evaluation must use one set."""
    if not ctx.enabled:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def mark_finished(ctx: DistContext) -> None:
    """Called by every rank after its last collective (each fold ends with a barrier, after the main
    process has written its outputs): past this point a rank only tears down (pipeline.train_on_cpu_ranks)."""
    from tgs_salt.pipeline import FINISHED_DIR_ENV, finished_mark

    directory = os.environ.get(FINISHED_DIR_ENV)
    if ctx.enabled and directory:
        with open(finished_mark(directory, ctx.rank), "w"):
            pass


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()  # every group, the BatchNorm ones too
        _BN_GROUPS.clear()  # not kept alive into the interpreter's exit


# ----------------------------------------------------------------------------- BatchNorm synced on a CPU
# torch.nn.SyncBatchNorm runs on GPUs only (its statistics kernels have no CPU version). This one
# normalises with the statistics of every process's batch, as SyncBatchNorm does: per channel, the
# count, sum and sum of squares are all-reduced in the forward pass, the gradient's two sums in the
# backward one. Both passes use oneDNN's fused batch-norm kernels (torch.var_mean is ~10x slower on
# channels_last): in one process 1.05x the step time of plain BatchNorm for the cpu_budget model
# (measured once); between two gloo processes the two all-reduces per layer cost far more: 2 processes
# train at 0.69-0.74x one process's images/s (bench/results/cpu_processes_cpu_budget_avx2_sync_bn*.json).


# The BatchNorm process group per default group, made on the first synchronised forward pass (every
# process reaches it in the same order). Kept here, not on the layers: the EMA copy deep-copies the
# model, and a process group can be neither copied nor pickled.
_BN_GROUPS: dict = {}


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # a group of its own: on the default one, the backward pass's sums would queue behind DDP's
        # gradient buckets (made by every process at its first BatchNorm layer, so in the same order)
        key = id(dist.group.WORLD)
        if key not in _BN_GROUPS:
            _BN_GROUPS[key] = dist.new_group(backend="gloo")
        dist.all_reduce(t, group=_BN_GROUPS[key])
    return t


class _SyncBatchNormCPU(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):
        c = x.shape[1]
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        n = x.numel() // c
        _, mean, invstd = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        var = invstd.pow(-2) - eps
        stats = _all_reduce(torch.cat([mean * n, (var + mean * mean) * n, mean.new_full((1,), n)]))
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min_(0)
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(var * total / (total - 1).clamp_min(1), momentum)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.total, ctx.fmt = eps, total, fmt
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, g):
        x, weight, mean, var = ctx.saved_tensors
        c = x.shape[1]
        g = g.contiguous(memory_format=ctx.fmt)
        invstd = torch.rsqrt(var + ctx.eps)
        # this process's sums of g and g * x_hat (the bias' and weight's gradients), then everyone's
        _, gw, gb = torch.ops.aten.native_batch_norm_backward(g, x, weight, None, None, mean, invstd, True, ctx.eps,
                                                              [False, True, True])
        sums = _all_reduce(torch.cat([gb, gw])) / ctx.total
        # d/dx = w * invstd * (g - mean(g) - x_hat * mean(g * x_hat)): the first term fused, the rest per channel
        gi = torch.ops.aten.native_batch_norm_backward(g, x, weight, mean, var, None, None, False, ctx.eps,
                                                       [True, False, False])[0]
        k = weight * invstd
        cx = -k * invstd * sums[c:]
        gi.addcmul_(x, cx[None, :, None, None]).add_((-k * sums[:c] - cx * mean)[None, :, None, None])
        return gi, gw, gb, None, None, None, None


class SyncBatchNormCPU(torch.nn.BatchNorm2d):
    """BatchNorm2d over the batches of all processes of the group (the same parameters and buffers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu":
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return _SyncBatchNormCPU.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                       self.momentum)


def convert_sync_batchnorm_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """Every affine BatchNorm2d with running statistics replaced by SyncBatchNormCPU (the same state)."""
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d and child.affine and child.track_running_stats and child.momentum:
            new = SyncBatchNormCPU(child.num_features, child.eps, child.momentum).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm_cpu(child)
    return module
