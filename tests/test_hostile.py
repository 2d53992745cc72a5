"""Hostile input: malformed configs, data files and checkpoints end in one clear line and a non-zero exit, never a
traceback or a hang; a checkpoint crafted to run code when unpickled is refused without running it."""

import contextlib
import io
import json
import pickle

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from difflab.cli import main
from difflab.config import RunConfig, apply, validate
from difflab.errors import DifflabError
from difflab.training.checkpoint import WEIGHTS

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3))
keys = st.one_of(st.sampled_from(["steps", "lr", "width", "depth", "name", "batch_size", "ema_decay", "options",
                                  "precond", "kind", "T", "seed", "n_train", "on_nonfinite", "init"]),
                 st.text(min_size=1, max_size=10))
sections = st.one_of(st.sampled_from(["data", "model", "schedule", "objective", "train"]), st.text(max_size=8))
configs = st.dictionaries(sections, st.one_of(st.dictionaries(keys, scalars, max_size=4), scalars), max_size=3)


def run_cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


@SETTINGS
@given(configs)
@example({"data": {"\n": 0}})  # a key with a line break, once printed on two lines
@example({"model": {"x\x1e": 1}, "train": {"steps": "1\r\n2"}})
def test_any_config_dict_is_accepted_or_refused_cleanly(d):
    cfg = RunConfig()
    try:
        apply(cfg, d)
        validate(cfg)
    except DifflabError as e:
        assert "\n" not in str(e) and str(e)


def _toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, float) or np.isfinite(v) else ("nan" if v != v else "inf")


@SETTINGS
@given(configs, st.text(max_size=40))
def test_the_cli_answers_any_config_file_in_one_line(tmp_path, d, junk):
    lines = []
    for sec, values in d.items():
        lines.append(f"[{json.dumps(sec)}]")
        if isinstance(values, dict):
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in values.items()]
    (tmp_path / "c.toml").write_text("\n".join(lines) + "\n" + junk)
    code, err = run_cli(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "r"), "--dry-run",
                         "--quiet"])
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from([".npy", ".npz", ".csv"]))
def test_the_cli_answers_any_data_file_in_one_line(tmp_path, blob, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(blob)
    code, err = run_cli(["train", "--data", str(path), "--out", str(tmp_path / "r"), "--dry-run", "--quiet"])
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    code, err = run_cli(["eval", str(path), "--data", "dino"])
    assert code in (0, 2) and "Traceback" not in err


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_pickle_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    assert main(["train", "--out", str(tmp_path / "r"), "--steps", "3", "--width", "8", "--depth", "1", "--set",
                 "train.batch_size=8", "--set", "data.n_train=50", "--quiet"]) == 0
    ckpt = next((tmp_path / "r" / "checkpoints").iterdir())
    marker = tmp_path / "pwned"
    (ckpt / WEIGHTS).write_bytes(pickle.dumps(_Payload(str(marker))))
    code, err = run_cli(["sample", str(tmp_path / "r"), "--n", "4", "--quiet"])
    assert code == 2 and "is corrupt" in err and not marker.exists()
    torch_style = tmp_path / "evil.pt"
    torch_style.write_bytes(pickle.dumps(_Payload(str(marker))))
    code, err = run_cli(["eval", str(torch_style), "--data", "dino"])
    assert code == 2 and not marker.exists()
