"""``python -m tgs_salt run``: the whole job, data to submission (what ``./run_all.sh`` runs
after setting up the environment).

    data (the Kaggle folder, else a download, else the synthetic demo) -> config -> folds ->
    train (in this process, or one fold per free GPU from a queue) -> CV -> predict -> submission
    [-> kaggle submit]

Every stage logs to ``<run dir>/logs/<stage>.log`` as well as to the console; a failing stage
is named with its log. Completed folds are skipped and interrupted ones resumed, so running it
again continues where it stopped. The last two lines on stdout are the CV score and the
submission's path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tgs_salt import paths
from tgs_salt.errors import UserError
from tgs_salt.rundir import RunDir

log = logging.getLogger("tgs_salt.run")

BANNER = """\
################################################################################
#  NO KAGGLE DATA FOUND: running the SYNTHETIC DEMO (made-up seismic images).   #
#  Its scores say nothing about the competition. For the real thing:            #
#    1. accept the rules at kaggle.com/c/tgs-salt-identification-challenge      #
#    2. put kaggle.json in ~/.kaggle/ (or set KAGGLE_USERNAME and KAGGLE_KEY)   #
#    3. run ./run_all.sh again (it downloads into data/), or --data-dir DIR     #
################################################################################"""


def add_arguments(s) -> None:
    s.add_argument("--config", help="YAML config, a path or a shipped name (default: demo on synthetic data, "
                                    "competition on a GPU, cpu_budget on a CPU)")
    s.add_argument("--data-dir", help="Kaggle-format folder (default: $TGS_DATA_DIR or data/)")
    s.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    s.add_argument("--folds", help="comma-separated folds to train (default: the config's)")
    s.add_argument("--force", action="store_true", help="retrain the folds asked for even if complete")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--gpus-per-fold", type=int, default=1, metavar="G",
                   help="GPUs per fold (a torchrun group of G); folds share the GPUs from a queue")
    s.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="everything after set-up ends within MINUTES (default: the config's train.time_budget_minutes)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=5e-4 (repeatable)")
    s.add_argument("--submit", action="store_true", help="submit to Kaggle at the end (needs -m)")
    s.add_argument("-m", "--message", help="the Kaggle submission message")
    s.add_argument("--synth-size", default="1000,500", metavar="TRAIN,TEST",
                   help="synthetic demo size when there is no Kaggle data (default 1000,500)")


def _cli(*argv) -> int:
    """Run a ``python -m tgs_salt`` command in this process; UserErrors propagate."""
    from tgs_salt.cli import build_parser

    args = build_parser().parse_args([str(a) for a in argv])
    return int(args.func(args) or 0)


def has_data(d: Path) -> bool:
    return all((d / f).is_file() for f in ("train.csv", "depths.csv", "sample_submission.csv")) and \
        (d / "train" / "images").is_dir() and (d / "test" / "images").is_dir()


class Stages:
    """Named stages, each logged to ``<log dir>/<name>.log`` too; a failure names the stage."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def provisional(cls, runs_dir: Path) -> Stages:
        """Stages logging to a folder of this job's own under ``runs_dir/logs`` until the run directory
        is known: two jobs started at once in one checkout do not mix or take each other's logs."""
        return cls(runs_dir / "logs" / f"job-{os.getpid()}")

    def move_to(self, log_dir: Path) -> None:
        """Move the logs written so far to ``log_dir`` (the run directory's, once known); the
        provisional directory goes too when nothing else is left in it, and so does its parent
        ``logs`` folder (:meth:`provisional`) when that is left empty."""
        log_dir.mkdir(parents=True, exist_ok=True)
        for f in self.log_dir.glob("*.log"):
            shutil.move(str(f), log_dir / f.name)
        if self.log_dir.resolve() != log_dir.resolve():
            with contextlib.suppress(OSError):  # not empty (something else is in it): kept
                self.log_dir.rmdir()
                if self.log_dir.name.startswith("job-"):
                    self.log_dir.parent.rmdir()  # not empty (another job's folder): kept
        self.log_dir = log_dir

    @contextlib.contextmanager
    def __call__(self, name: str, what: str = ""):
        self.log_dir.mkdir(parents=True, exist_ok=True)  # another job in this checkout may have tidied it away
        path = self.log_dir / f"{name}.log"
        handler = logging.FileHandler(path, mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root = logging.getLogger()
        root.addHandler(handler)
        print(f"== [{name}] {what}".rstrip(), file=sys.stderr, flush=True)
        try:
            yield path
        except UserError as exc:
            log.error("%s", exc)
            err = UserError(f"stage '{name}' failed: {exc} (see {path})")
            err.exit_code = exc.exit_code
            raise err from None
        finally:
            root.removeHandler(handler)
            handler.close()


def choose_data(data_dir: Path, stages: Stages, synth_size: str) -> tuple[Path, bool]:
    """(data folder, synthetic?): the Kaggle folder, else a download, else the synthetic demo."""
    from tgs_salt.kaggle_api import has_credentials

    if has_data(data_dir):
        log.info("using the Kaggle data in %s", data_dir)
        return data_dir, False
    if has_credentials():
        with stages("download"):
            _cli("download", "--data-dir", data_dir)
        return data_dir, False
    print(BANNER, file=sys.stderr, flush=True)
    synth = data_dir / "synthetic"
    if not has_data(synth):
        try:
            n_train, n_test = (int(x) for x in synth_size.split(","))
        except ValueError:
            raise UserError(f"--synth-size {synth_size!r}: expected TRAIN,TEST image counts, e.g. 1000,500") from None
        with stages("synth"):
            _cli("synth", synth, "--train", n_train, "--test", n_test, "--seed", 0, "--force")
    return synth, True


def gpu_slots(n_gpus: int, per_fold: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each fold slot. An inherited CUDA_VISIBLE_DEVICES is respected:
    slot j gets the j-th group of the devices it lists."""
    if per_fold < 1:
        raise UserError(f"--gpus-per-fold {per_fold}: a positive number")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d] if visible else [str(g) for g in range(n_gpus)]
    if len(devices) < n_gpus:
        raise UserError(f"CUDA_VISIBLE_DEVICES={visible} lists fewer than {n_gpus} GPUs")
    n_slots = n_gpus // per_fold
    if n_slots < 1:
        raise UserError(f"--gpus-per-fold {per_fold} but {n_gpus} GPU(s)")
    return [",".join(devices[j * per_fold:(j + 1) * per_fold]) for j in range(n_slots)]


def fold_status(run_dir: Path, fold: int) -> str:
    try:
        d = json.loads(RunDir(run_dir).done(fold).read_text())
    except (OSError, ValueError):
        return "no done.json"
    return (f"best metric {d['best_metric']:.4f} (epoch {d['best_epoch'] + 1}), kept epoch "
            f"{d.get('kept_epoch', d['best_epoch']) + 1}, OOF {d['oof_metric_tta']:.4f}, "
            f"{d['epochs_run']} epochs in {d['seconds'] / 60:.1f} min")


def train_queue(folds: list[int], slots: list[str], train_args: list[str], log_dir: Path, run_dir: Path,
                per_fold: int) -> None:
    """Train ``folds`` on the GPU ``slots``: a free slot takes the next fold from the queue (no waves
    waiting for the slowest). One status line per fold on the console; each fold's output goes
    to ``logs/train_fold<k>.log``."""
    todo: queue.Queue[int] = queue.Queue()
    for f in folds:
        todo.put(f)
    failed: list[str] = []
    lock = threading.Lock()

    def worker(devs: str) -> None:
        while not failed:
            try:
                f = todo.get_nowait()
            except queue.Empty:
                return
            logf = log_dir / f"train_fold{f}.log"
            if per_fold > 1:
                exe = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
                cmd = [exe, "--standalone", f"--nproc-per-node={per_fold}", "-m", "tgs_salt"]
            else:
                cmd = [sys.executable, "-m", "tgs_salt"]
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=devs)
            with lock:
                print(f"== [train fold {f}] GPUs {devs}, log {logf}", file=sys.stderr, flush=True)
            t0 = time.time()
            with open(logf, "w") as fh:
                rc = subprocess.call([*cmd, "train", *train_args, "--fold", str(f)], stdout=fh,
                                     stderr=subprocess.STDOUT, env=env)
            with lock:
                if rc != 0:
                    failed.append(f"fold {f} (exit {rc}; see {logf})")
                    print(f"== [train fold {f}] FAILED after {(time.time() - t0) / 60:.1f} min: see {logf}",
                          file=sys.stderr, flush=True)
                else:
                    print(f"== [train fold {f}] done: {fold_status(run_dir, f)}", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise UserError("training failed: " + "; ".join(failed))


def cpu_processes(cfg: dict, device_type: str, cores: int | None = None) -> tuple[int, int]:
    """(processes, threads per process) that train on a CPU: ``train.cpu_processes``, at most one per
    core, the cores shared out among them; (1, 0) on a GPU or with one process (0: train's own default)."""
    from tgs_salt.hardware import usable_cores

    want = cfg["train"]["cpu_processes"]
    cores = cores or usable_cores()
    n = min(want, cores)
    if device_type != "cpu" or n <= 1:
        return 1, 0
    if cfg["train"]["batch_size"] % n:
        raise UserError(f"train.batch_size {cfg['train']['batch_size']} is not divisible by the {n} training "
                        f"processes (train.cpu_processes {want} on {cores} cores)")
    return n, cores // n


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set by train_on_cpu_ranks: a directory where each rank leaves a mark when its work is done
# (distributed.mark_finished), so that a rank which dies afterwards, in the process group's teardown
# (once in CI: gloo's "terminate called without an active exception", SIGABRT), is not taken for a
# failed training.
FINISHED_DIR_ENV = "TGS_RANKS_FINISHED_DIR"


def finished_mark(directory: str | os.PathLike, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.finished")


def train_on_cpu_ranks(n: int, threads: int, train_args: list[str], log_path: Path,
                       teardown_grace_s: float = 60.0) -> None:
    """``train`` data-parallel in ``n`` local processes of ``threads`` threads each (the gloo backend,
    as torchrun would start them). Rank 0's output goes to the console and ``log_path``, each other
    rank's to ``train_rank<r>.log`` beside it. If a rank fails, the others are stopped (they would
    wait for it in the next collective) and the failure is named with its log.

    A rank that dies after it marked its work done (``distributed.mark_finished``: past the last
    collective, every output written) died in the process group's teardown: the others are past the
    last collective too, so they are given ``teardown_grace_s`` to exit by themselves, and when every
    rank had marked its work done the training stands, with a warning naming the rank."""
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    stopped: set[int] = set()  # the ranks stopped here because another failed
    logs = [log_path] + [log_path.with_name(f"train_rank{r}.log") for r in range(1, n)]
    marks = Path(tempfile.mkdtemp(prefix="tgs_ranks_"))

    def finished(r: int) -> bool:
        return os.path.exists(finished_mark(marks, r))

    def watch() -> None:  # a rank that fails stops the group
        grace_end = None
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                if all(finished(r) for r in failed):  # died in teardown: the others are past their work too
                    grace_end = grace_end or time.monotonic() + teardown_grace_s
                if grace_end is None or time.monotonic() >= grace_end:
                    for r, p in enumerate(procs):
                        if p.poll() is None:
                            stopped.add(r)
                            p.terminate()
                    return
            time.sleep(0.5)

    with contextlib.ExitStack() as files:
        files.callback(shutil.rmtree, marks, ignore_errors=True)
        try:
            for r in range(n):
                env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(n), RANK=str(r),
                           LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n), OMP_NUM_THREADS=str(threads))
                env[FINISHED_DIR_ENV] = str(marks)
                cmd = [sys.executable, "-m", "tgs_salt", "train", *train_args, "--threads", str(threads)]
                out = subprocess.PIPE if r == 0 else files.enter_context(open(logs[r], "w"))
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, text=True,
                                              bufsize=1))
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            fh = files.enter_context(open(log_path, "a"))
            for line in procs[0].stdout:
                sys.stderr.write(line)
                sys.stderr.flush()
                fh.write(line)
                fh.flush()
            codes = [p.wait() for p in procs]
            watcher.join(timeout=5)
        except BaseException:  # Ctrl-C, or a rank that could not start: no orphaned ranks
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            raise
        done = [finished(r) for r in range(n)]
    bad = [(r, c) for r, c in enumerate(codes) if c != 0]
    if bad and all(done):
        for r, c in bad:
            log.warning("training rank %d exited with %d after its work was done (%s), in the process group's "
                        "teardown: every rank had finished, the folds are complete (see %s)", r, c,
                        "stopped here after the grace period" if r in stopped else "by itself", logs[r])
        return
    if bad:
        # the one that failed (an exit code, or a signal of its own), not the ones stopped
        first = next(((r, c) for r, c in bad if r not in stopped), bad[0])
        raise UserError(f"training in {n} processes failed: rank {first[0]} exited with {first[1]} "
                        f"(see {logs[first[0]]})")


def count_gpus(device: str) -> int:
    if device == "cpu":
        return 0
    if os.environ.get("TGS_GPUS"):  # fewer GPUs than torch sees (the tests use it to run the queue on CPU)
        return int(os.environ["TGS_GPUS"])
    import torch

    return torch.cuda.device_count()


def run_command(args) -> int:
    from tgs_salt.config import load_config
    from tgs_salt.hardware import resolve_device
    from tgs_salt.train import parse_folds

    os.environ.setdefault("TGS_JOB_START", str(time.time()))  # the time budget counts from here
    t_start = float(os.environ["TGS_JOB_START"])
    if args.submit and not args.message:
        raise UserError("--submit needs a message: --submit -m \"my message\"")
    stages = Stages.provisional(paths.runs_dir())  # until the run directory is known
    data_dir, synthetic = choose_data(Path(args.data_dir) if args.data_dir else paths.data_dir(), stages,
                                      args.synth_size)
    device_type = resolve_device(args.device).type  # GPUs torch cannot use: stops here, saying what to install
    config = args.config or ("demo" if synthetic else "competition" if device_type == "cuda" else "cpu_budget")
    with stages("config", config):
        cfg = load_config(config, args.set)
        folds = parse_folds(None, args.folds, cfg)
    run_dir = Path(args.run_dir) if args.run_dir else paths.runs_dir() / cfg["name"]
    stages.move_to(RunDir(run_dir).root / "logs")
    log.info("config %s, data %s, run directory %s, device %s", config, data_dir, run_dir, device_type)

    with stages("folds"):
        _cli("folds", "--config", config, "--data-dir", data_dir)
    sets = [x for s in args.set for x in ("--set", s)]
    train_args = ["--config", config, "--data-dir", data_dir, "--run-dir", run_dir, "--resume", "--device",
                  args.device, *(["--force"] if args.force else []),
                  *(["--time-budget", args.time_budget] if args.time_budget is not None else []), *sets]
    train_args = [str(a) for a in train_args]
    n_gpus = count_gpus(args.device)  # TGS_GPUS applies to --device auto too (the tests' CPU slots)
    if n_gpus >= 2 or args.gpus_per_fold > 1:
        slots = gpu_slots(n_gpus, args.gpus_per_fold)
        print(f"run: {n_gpus} GPUs, {args.gpus_per_fold} per fold, {len(slots)} fold(s) at a time "
              f"(slots {' | '.join(slots)})", file=sys.stderr, flush=True)
        with stages("plan", "precision and time plan, once for all folds"):
            _cli("train", *train_args, "--folds", ",".join(map(str, folds)), "--plan-only",
                 "--parallel-folds", len(slots))
        with stages("train", f"folds {folds} from a queue"):
            train_queue(folds, slots, train_args, stages.log_dir, run_dir, args.gpus_per_fold)
    else:
        procs, threads = cpu_processes(cfg, device_type)
        with stages("train", f"folds {folds}" + (f" in {procs} processes of {threads} thread(s)" if procs > 1
                                                  else "")) as log_path:
            if procs > 1:
                train_on_cpu_ranks(procs, threads, [*train_args, "--folds", ",".join(map(str, folds))], log_path)
            else:
                _cli("train", *train_args, "--folds", ",".join(map(str, folds)))
            for f in folds:
                print(f"== [train fold {f}] {fold_status(run_dir, f)}", file=sys.stderr, flush=True)

    with stages("cv"):
        _cli("cv", "--run-dir", run_dir, "--data-dir", data_dir)
    cv = json.loads(RunDir(run_dir).cv.read_text())
    with stages("predict"):
        _cli("predict", "--run-dir", run_dir, "--data-dir", data_dir, "--device", args.device)
    submission = json.loads(RunDir(run_dir).submission_record.read_text())["submission"]
    if args.submit:
        with stages("submit"):
            _cli("submit", submission, "-m", args.message, "--data-dir", data_dir)
    if synthetic:
        print("run: (synthetic demo data: scores are not competition scores)", file=sys.stderr)
    took = time.time() - t_start
    print(f"run: done in {int(took // 60)} min {int(took % 60)} s after set-up", file=sys.stderr)
    print(f"CV score: {cv['score']:.4f} (threshold {cv['default_threshold']:.2f}: "
          f"{cv['score_default_threshold']:.4f}; nested: {cv['score_nested']:.4f}; the submission's "
          f"{cv['applied']} post-processing: {cv['score_applied']:.4f} held out, {cv['score_policy']:.4f} with "
          "the choice made held out too)")
    print(submission)
    return 0
