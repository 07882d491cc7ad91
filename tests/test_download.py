import io
import sys
import types
import zipfile

import pytest

from tgs_salt.data import download as dl
from tgs_salt.data.kaggle_io import load_train
from tgs_salt.errors import UserError


def _zip_bytes(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


class FakeApi:
    def __init__(self, synth_dir, error=None):
        self.synth_dir = synth_dir
        self.error = error
        self.calls = []

    def authenticate(self):
        pass

    def competition_download_files(self, competition, path=None, force=False, quiet=True):
        self.calls.append(competition)
        if self.error:
            raise self.error
        d = self.synth_dir
        train = {f"{sub}/{p.name}": p.read_bytes() for sub in ("images", "masks")
                 for p in (d / "train" / sub).glob("*.png")}
        test = {f"images/{p.name}": p.read_bytes() for p in (d / "test" / "images").glob("*.png")}
        outer = {"train.zip": _zip_bytes(train), "test.zip": _zip_bytes(test)}
        for f in ("train.csv", "depths.csv", "sample_submission.csv"):
            outer[f] = (d / f).read_bytes()
        with open(f"{path}/{competition}.zip", "wb") as fh:
            fh.write(_zip_bytes(outer))


@pytest.fixture
def fake_kaggle(monkeypatch, synth_dir):
    api = FakeApi(synth_dir)
    monkeypatch.setitem(sys.modules, "kaggle", types.SimpleNamespace(api=api))
    monkeypatch.setenv("KAGGLE_USERNAME", "user")
    monkeypatch.setenv("KAGGLE_KEY", "key")
    return api


def test_download_unpacks_nested_archives(fake_kaggle, tmp_path):
    out = dl.download(tmp_path / "data")
    assert fake_kaggle.calls == ["tgs-salt-identification-challenge"]
    assert len(load_train(out)) == 60
    assert not list(out.rglob("*.zip"))


def test_download_without_credentials(monkeypatch, tmp_path):
    for v in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nothing"))
    with pytest.raises(UserError) as e:
        dl.download(tmp_path / "data")
    assert "kaggle.json" in str(e.value) and "KAGGLE_KEY" in str(e.value) and "rules" in str(e.value)


def test_download_rules_not_accepted(fake_kaggle, tmp_path):
    fake_kaggle.error = RuntimeError("403 Client Error: Forbidden")
    with pytest.raises(UserError) as e:
        dl.download(tmp_path / "data")
    assert "403" in str(e.value) and "rules" in str(e.value)
    assert not (tmp_path / "data").exists()
