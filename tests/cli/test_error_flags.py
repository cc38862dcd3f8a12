"""Library errors name options as in Python (``split``, ``image_size=28``) and list them in
``FewshotError.options``; the CLI shows each as the command's flag (``cli.common.show_flags``,
applied by ``handle_errors`` to every command)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import fewshot
from fewshot.cli import app
from fewshot.cli.common import show_flags
from fewshot.errors import DataError, FewshotError

runner = CliRunner()


def said(*args, code: int) -> str:
    """The command's output as one line (rich wrapping removed)."""
    r = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    return " ".join(r.output.split())


def test_an_unknown_split_names_the_parameter_in_python_and_the_flag_on_the_command_line(grocery_root, tmp_path):
    with pytest.raises(DataError, match="unknown split 'nosuch'") as err:
        fewshot.load_dataset(grocery_root, split="nosuch")
    assert err.value.options == ("split",) and "as split" in err.value.hint and "--" not in str(err.value)
    text = said("evaluate", "--data", grocery_root, "--split", "nosuch", "--out", tmp_path / "ev", code=1)
    assert "error: unknown split 'nosuch'" in text and "as --split" in text and not (tmp_path / "ev").exists()


def test_backbone_and_runtime_errors_name_their_flags(small_manifest, tmp_path):
    with pytest.raises(FewshotError, match="no pretrained weights") as err:
        fewshot.create_backbone("conv4", image_size=28)
    assert "(backbone='conv4', pretrained=False, fine_tune='all', image_size=28)" in err.value.hint
    assert "--" not in err.value.hint
    text = said("embed", "--data", small_manifest, "--backbone", "conv4", "--out", tmp_path / "e.npz", code=1)
    assert ("fix: train it from scratch (--backbone conv4, --from-scratch, --fine-tune all, --image-size 28), "
            "then pass --model RUN_DIR") in text
    text = said("embed", "--data", small_manifest, "--runtime", "fast", "--out", tmp_path / "e.npz", code=1)
    assert "error: unknown runtime 'fast'" in text and "fix: use --runtime auto, 'torch' or 'onnx'" in text


def test_show_flags_rewrites_whole_option_names_only():
    exc = FewshotError("dataset x has image splits test but no 'val' split; split_file split.json in data/split",
                       hint="pass split='test', split=None or option split = 'a b'; see split.", options=("split",))
    show_flags(exc)
    assert exc.message == "dataset x has image splits test but no 'val' split; split_file split.json in data/split"
    assert exc.hint == "pass --split test, --split None or --split 'a b'; see --split."
    assert exc.args == (exc.message,)


def test_show_flags_uses_the_commands_flags_and_boolean_values():
    exc = FewshotError("pretrained=False trains conv4; option m = 7 does not divide 64",
                       hint="leave strict off, pass resume=True, progress=False, model_dir=RUN, num_workers",
                       options=("pretrained", "m", "strict", "resume", "progress", "model_dir", "num_workers"))
    show_flags(exc, {"m": "--pq-m"})
    assert exc.message == "--from-scratch trains conv4; --pq-m 7 does not divide 64"
    assert exc.hint == "leave --strict off, pass --resume, --no-progress, --model RUN, --workers"
    unnamed = FewshotError("split it", hint="split=all")  # no options: nothing is rewritten
    assert show_flags(unnamed).hint == "split=all"
