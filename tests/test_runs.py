"""`python -m tgs_salt runs`: one row per run."""

import json

import yaml

from tgs_salt import config as C
from tgs_salt.cli import main


def test_runs_table(tmp_path, capsys):
    for name, lr, score in (("a", 2e-3, 0.71), ("b", 5e-4, 0.74)):
        d = tmp_path / name
        (d / "fold0").mkdir(parents=True)
        cfg = C.load_config("demo", [f"train.lr={lr}"])
        (d / "config.yaml").write_text(C.dump(cfg))
        (d / "cv.json").write_text(json.dumps({"score": score, "score_default_threshold": score - 0.01,
                                               "threshold": 0.45, "min_area": 20}))
        (d / "fold0" / "done.json").write_text(json.dumps({"epochs_run": 12, "seconds": 600, "device": "cpu",
                                                           "precision": "fp32+channels_last"}))
    (tmp_path / "not-a-run").mkdir()
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "config", "cv_default", "cv_nested"]
    assert len(lines) == 3
    a, b = lines[1], lines[2]
    assert a.startswith("a ") and "0.7100" in a and "0.7000" in a and "fp32+channels_last" in a and "10.0" in a
    assert "train.lr=0.002 " in a and "train.lr=0.0005" in b and "model.arch=\"plain_unet\"" in b
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["name"] == "demo"
