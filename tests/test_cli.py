"""The `stopgrad-lr` command on real .keras files: results, refusals, errors.

Most tests call `main` in-process; those about start-up, log noise, file
permissions and signals run `python -m stopgrad_lr` in a real subprocess.
Every error must be one line on stderr, with exit status 2 for bad input, 1
for a failure to write or an unexpected error, 130/143 for SIGINT/SIGTERM,
and must leave no output file behind.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import _models
import keras
import numpy as np
import pytest

import stopgrad_lr
from stopgrad_lr import GradientScale, GradientStop, cli, effective_multipliers
from stopgrad_lr._patterns import iter_layers

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "cli.md"


def run_command(*argv, env=None, **options):
    """Runs `python -m stopgrad_lr ARGV...` from the repository root, so that
    this checkout's package runs, with TensorFlow's log level left unset:
    hiding its start-up lines is the command's job."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")
    }
    environment["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "stopgrad_lr", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**environment, **(env or {})},
        timeout=300,
        **options,
    )


def assert_one_error_line(result, *fragments, status=2):
    assert result.returncode == status, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("stopgrad-lr: error: ")
    for fragment in fragments:
        assert fragment in line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small models saved once; tests that may overwrite a file copy it."""
    folder = tmp_path_factory.mktemp("models")
    residual, images = _models.residual_cnn()
    residual.save(folder / "residual.keras")
    mlp, rows = _models.sequential_mlp()
    mlp.save(folder / "mlp.keras")
    inputs = keras.Input((6,))
    doubled = keras.layers.Lambda(lambda t: t * 2.0, name="double")(
        keras.layers.Dense(4, name="body")(inputs)
    )
    with_lambda = keras.Model(inputs, keras.layers.Dense(2, name="head")(doubled))
    with_lambda.save(folder / "lambda.keras")
    return SimpleNamespace(
        folder=folder,
        residual=folder / "residual.keras",
        images=images,
        mlp=folder / "mlp.keras",
        rows=rows,
        with_lambda=folder / "lambda.keras",
    )


def run(capsys, *argv):
    status = cli.main([str(argument) for argument in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_error(result, *fragments, status=2):
    code, out, err = result
    assert code == status
    (line,) = err.splitlines()
    assert line.startswith("stopgrad-lr: error: ")
    for fragment in fragments:
        assert fragment in line
    assert "Traceback" not in out + err
    assert_command_terms(line)


# Python argument syntax, which the command's messages must say as flags.
PYTHON_ARGUMENT = re.compile(r"\b(on_bypass|mechanism|stop_at_zero|optimizer)=")


def assert_command_terms(line):
    assert not PYTHON_ARGUMENT.search(line), line
    assert "check_optimizer(optimizer, model)" not in line, line


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(path):
    return keras.saving.load_model(path, compile=False)


def scale_layers(model):
    return [
        layer
        for _, layer in iter_layers(model)
        if isinstance(layer, GradientScale | GradientStop)
    ]


def assert_same_outputs(first, second, data):
    a = keras.ops.convert_to_numpy(first(data))
    b = keras.ops.convert_to_numpy(second(data))
    assert np.array_equal(a, b)


# inspect


def test_inspect_prints_the_summary_table(files, capsys):
    lines = []
    stopgrad_lr.summary(load(files.residual), print_fn=lines.append)
    status, out, err = run(capsys, "inspect", files.residual)
    assert (status, err) == (0, "")
    assert out.splitlines() == lines
    assert lines[-1] == "Total trainable params: 3765"


def test_python_m_stopgrad_lr_runs_the_command_without_backend_noise(files):
    # TensorFlow writes 3-8 start-up lines to fd 2 (CUDA, oneDNN, CPU
    # features), some even with TF_CPP_MIN_LOG_LEVEL=3; run_command leaves
    # that variable unset.
    result = run_command("inspect", files.mlp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:2] == ["block1", "Dense"]
    assert result.stderr == ""


# rewrite


def test_rewrite_scale_with_globs_and_regexes(files, tmp_path, capsys):
    before = digest(files.residual)
    output = tmp_path / "out.keras"
    status, out, err = run(
        capsys,
        "rewrite",
        files.residual,
        output,
        "--scale",
        "stem_*t=0.1",
        "--scale",
        r"re:block\d_out=0.5",
    )
    assert (status, err) == (0, "")
    assert out.splitlines()[-1] == f"Wrote {output}."
    assert "stem_out_gradient_scale" in out
    assert digest(files.residual) == before
    rewritten = load(output)
    assert effective_multipliers(rewritten) == {
        "stem_conv": 0.025,
        "stem_bn": 0.025,
        "block1_conv1": 0.25,
        "block1_conv2": 0.25,
        "block2_conv1": 0.5,
        "block2_conv2": 0.5,
        "block2_proj": 0.5,
        "head": 1.0,
    }
    assert_same_outputs(load(files.residual), rewritten, files.images)


def test_rewrite_multiplier_places_scales_at_cuts(files, tmp_path, capsys):
    output = tmp_path / "out.keras"
    status, _, err = run(
        capsys,
        "rewrite",
        files.residual,
        output,
        "--multiplier",
        "stem_*=0.01",
        "--multiplier",
        r"re:block1_conv\d=0.1",
    )
    assert (status, err) == (0, "")
    multipliers = effective_multipliers(load(output))
    assert multipliers["stem_conv"] == multipliers["stem_bn"] == 0.01
    assert multipliers["block1_conv1"] == multipliers["block1_conv2"] == 0.1
    assert multipliers["block2_conv1"] == multipliers["head"] == 1.0


def test_rewrite_multiplier_for_adam_reparametrises_inside_a_residual_block(
    files, tmp_path, capsys
):
    output = tmp_path / "out.keras"
    status, _, err = run(
        capsys,
        "rewrite",
        files.residual,
        output,
        "--multiplier",
        "block1_conv2=0.25",
        "--optimizer",
        "adam",
    )
    assert (status, err) == (0, "")
    rewritten = load(output)
    scales = [
        layer
        for layer in rewritten.layers
        if isinstance(layer, stopgrad_lr.ParameterScale)
    ]
    assert [layer.scale for layer in scales] == [0.25]  # c = m for Adam
    # A power of two: the reparametrised model computes the same bits.
    assert_same_outputs(load(files.residual), rewritten, files.images)
    assert stopgrad_lr.check_optimizer(keras.optimizers.Adam(), rewritten).ok


def test_rewrite_decay(files, tmp_path, capsys):
    output = tmp_path / "out.keras"
    status, _, err = run(
        capsys,
        "rewrite",
        files.residual,
        output,
        "--decay",
        "block*_out=0.5",
        "--decay",
        "stem_out=0.5",
    )
    assert (status, err) == (0, "")
    multipliers = effective_multipliers(load(output))
    assert multipliers["stem_conv"] == 0.125
    assert multipliers["block1_conv1"] == 0.25
    assert multipliers["block2_proj"] == 0.5


@pytest.mark.parametrize(
    ("flags", "kind"), [((), GradientStop), (("--no-stop-at-zero",), GradientScale)]
)
def test_a_zero_scale_is_a_stop_unless_asked(files, tmp_path, capsys, flags, kind):
    output = tmp_path / "out.keras"
    status, _, _ = run(
        capsys, "rewrite", files.mlp, output, "--scale", "block1=0", *flags
    )
    assert status == 0
    (layer,) = scale_layers(load(output))
    assert type(layer) is kind
    assert layer.scale == 0.0


def test_on_bypass_error_warn_ignore(files, tmp_path, capsys):
    argv = ["rewrite", files.residual, tmp_path / "out.keras"]
    argv += ["--scale", "block1_conv1=0.1"]
    assert_error(
        run(capsys, *argv),
        "'block1_conv1' is bypassed along",
        "pass --on-bypass warn or --on-bypass ignore",
        "the Cut column of `stopgrad-lr inspect` lists them",
    )
    assert not (tmp_path / "out.keras").exists()

    status, out, err = run(capsys, *argv, "--on-bypass", "warn")
    assert status == 0
    (line,) = err.splitlines()
    assert line.startswith("stopgrad-lr: warning: ") and "bypassed" in line
    assert_command_terms(line)
    assert "mixed: 0.1, 1" in out

    status, _, err = run(capsys, *argv, "--on-bypass", "ignore", "--force")
    assert (status, err) == (0, "")


# strip


def test_strip_removes_every_scale_layer(files, tmp_path, capsys):
    scaled, plain = tmp_path / "scaled.keras", tmp_path / "plain.keras"
    run(capsys, "rewrite", files.residual, scaled, "--scale", "*_out=0.5")
    status, out, err = run(capsys, "strip", scaled, plain)
    assert (status, err) == (0, "")
    assert out == f"Wrote {plain}: removed 3 stopgrad_lr layers.\n"
    stripped = load(plain)
    assert scale_layers(stripped) == []
    assert_same_outputs(load(files.residual), stripped, files.images)


# Files: never the input, --force, atomic writes


def test_existing_output_or_the_input_itself_needs_force(files, tmp_path, capsys):
    source = tmp_path / "in.keras"
    shutil.copy(files.mlp, source)
    link = tmp_path / "link.keras"
    link.symlink_to(source)
    other = tmp_path / "other.keras"
    other.write_bytes(b"keep me")
    before = digest(source)
    for output, message in [
        (source, "is the input file; pass --force"),
        (link, "is the input file; pass --force"),
        (other, "exists; pass --force"),
    ]:
        assert_error(run(capsys, "strip", source, output), f"{output} {message}")
    assert digest(source) == before and other.read_bytes() == b"keep me"

    os.chmod(other, 0o640)
    assert run(capsys, "strip", source, other, "--force")[0] == 0
    assert stat.S_IMODE(os.stat(other).st_mode) == 0o640
    assert load(other).layers[-1].name == "head"
    # Through the link, the input itself is replaced; the link stays a link.
    status, _, _ = run(
        capsys, "rewrite", source, link, "--scale", "block1=0.5", "--force"
    )
    assert status == 0 and link.is_symlink()
    assert effective_multipliers(load(source))["block1"] == 0.5


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_link_that_leads_nowhere_is_refused_before_loading(
    files, tmp_path, capsys, monkeypatch, kind
):
    output = tmp_path / "out.keras"
    output.symlink_to(output if kind == "loop" else tmp_path / "gone.keras")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as patch:
        patch.setattr(keras.saving, "load_model", never)
        for argv in (["strip"], ["rewrite", "--scale", "block1=0.5"]):
            result = run(capsys, argv[0], files.mlp, output, *argv[1:])
            assert_error(result, f"{output} exists", "symbolic link", "--force")
    assert sorted(os.listdir(tmp_path)) == ["out.keras"] and output.is_symlink()
    # --force replaces the link itself with the file.
    assert run(capsys, "strip", files.mlp, output, "--force")[0] == 0
    assert not output.is_symlink() and load(output).layers[-1].name == "head"
    assert sorted(os.listdir(tmp_path)) == ["out.keras"]


def test_a_250_character_output_name(files, tmp_path, capsys, monkeypatch):
    output = tmp_path / ("m" * (250 - len(".keras")) + ".keras")
    assert len(output.name) == 250
    made = []
    real_mkstemp = cli.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        descriptor, path = real_mkstemp(*args, **kwargs)
        made.append(Path(path))
        return descriptor, path

    monkeypatch.setattr(cli.tempfile, "mkstemp", mkstemp)
    status, _, err = run(capsys, "rewrite", files.mlp, output, "--scale", "block1=0.5")
    assert (status, err) == (0, "")
    (temporary,) = made
    assert temporary.parent == tmp_path and temporary.name.startswith(".mmm")
    assert len(temporary.name) <= 255
    assert os.listdir(tmp_path) == [output.name]
    assert effective_multipliers(load(output))["block1"] == 0.5
    # A short name keeps its plain temporary name.
    assert cli._temporary_prefix("out.keras") == ".out.keras."


def test_new_output_gets_the_usual_permissions(files, tmp_path, capsys):
    output = tmp_path / "out.keras"
    assert run(capsys, "strip", files.mlp, output)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(output).st_mode) == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["out.keras"]


REAL_SAVE = keras.saving.save_model


def failing_save(error):
    """A save that writes a whole file, then fails, as a full disk would."""

    def save(model, path, **kwargs):
        REAL_SAVE(model, path, **kwargs)
        raise error

    return save


def test_a_failed_save_leaves_no_file(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        keras.saving,
        "save_model",
        failing_save(OSError(28, "No space left on device")),
    )
    output = tmp_path / "out.keras"
    result = run(capsys, "rewrite", files.mlp, output, "--scale", "block1=0.5")
    assert_error(result, "cannot write", "No space left on device", status=1)
    assert os.listdir(tmp_path) == []

    # An existing output is left as it was.
    output.write_bytes(b"old")
    result = run(capsys, "strip", files.mlp, output, "--force")
    assert_error(result, "No space left on device", status=1)
    assert os.listdir(tmp_path) == ["out.keras"] and output.read_bytes() == b"old"

    # Any other failure is a bug: one line and status 1, the traceback only
    # with --verbose, and the cleanup all the same.
    monkeypatch.setattr(keras.saving, "save_model", failing_save(RuntimeError("bug")))
    result = run(capsys, "strip", files.mlp, output, "--force")
    assert_error(result, "unexpected RuntimeError: bug (rerun with --verbose", status=1)
    assert os.listdir(tmp_path) == ["out.keras"] and output.read_bytes() == b"old"
    status, _, err = run(capsys, "strip", files.mlp, output, "--force", "--verbose")
    assert status == 1
    assert "Traceback" in err and "RuntimeError: bug" in err
    assert err.splitlines()[-1] == "stopgrad-lr: error: unexpected RuntimeError: bug"
    assert os.listdir(tmp_path) == ["out.keras"] and output.read_bytes() == b"old"


def test_a_folder_where_no_temporary_file_can_be_made(files, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    output = tmp_path / "out.keras"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli.tempfile, "mkstemp", refuse)
        result = run(capsys, "strip", files.mlp, output)
    assert_error(result, f"cannot write {output}", "Permission denied", status=1)
    assert os.listdir(tmp_path) == []


def test_an_output_created_during_the_command_is_not_replaced(
    files, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "out.keras"

    def save_while_someone_else_writes(model, path, **kwargs):
        output.write_bytes(b"someone else's")
        REAL_SAVE(model, path, **kwargs)

    monkeypatch.setattr(keras.saving, "save_model", save_while_someone_else_writes)
    result = run(capsys, "rewrite", files.mlp, output, "--scale", "block1=0.5")
    assert_error(result, "was created by someone else", "left as it is", "--force")
    assert os.listdir(tmp_path) == ["out.keras"]
    assert output.read_bytes() == b"someone else's"
    # --force replaces it, as asked.
    status, _, _ = run(capsys, "strip", files.mlp, output, "--force")
    assert status == 0 and load(output).layers[-1].name == "head"
    assert os.listdir(tmp_path) == ["out.keras"]


# Safe mode


def test_safe_mode_refuses_a_lambda_unless_unsafe(files, tmp_path, capsys):
    assert_error(
        run(capsys, "inspect", files.with_lambda),
        "Lambda layer",
        "safe mode refuses. If you trust the file, pass --unsafe.",
    )
    output = tmp_path / "out.keras"
    assert_error(run(capsys, "rewrite", files.with_lambda, output, "--scale", "body=2"))
    assert not output.exists()

    status, out, _ = run(capsys, "inspect", files.with_lambda, "--unsafe")
    assert status == 0 and "double" in out
    argv = ["rewrite", files.with_lambda, output, "--scale", "body=2", "--unsafe"]
    assert run(capsys, *argv)[0] == 0
    assert effective_multipliers(load_unsafe(output))["body"] == 2.0


def load_unsafe(path):
    return keras.saving.load_model(path, compile=False, safe_mode=False)


# Bad input: exit status 2, one line, no output


def bad_input_cases(files, tmp_path):
    directory = tmp_path / "folder.keras"
    directory.mkdir()
    legacy = tmp_path / "model.h5"
    legacy.write_bytes(b"\x89HDF")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip file")
    out = tmp_path / "out.keras"
    rewrite = ["rewrite", files.residual, out]
    return [
        (["inspect", tmp_path / "missing.keras"], "missing.keras: no such file"),
        (["inspect", legacy], "model.h5 is not a .keras file"),
        (["inspect", directory], "folder.keras is not a .keras file"),
        (["inspect", corrupt], "corrupt.keras is not a valid .keras file: it is "),
        (["inspect", files.mlp, "--scale", "a=1"], "unrecognized arguments: --scale"),
        (["strip", files.mlp, tmp_path / "out.h5"], "must end with .keras"),
        (["strip", files.mlp, tmp_path / "no" / "out.keras"], "no such directory"),
        (["strip", files.mlp, directory], "folder.keras is a directory"),
        ([*rewrite, "--scale", "stem_out"], "expected PATTERN=NUMBER"),
        ([*rewrite, "--scale", "=0.1"], "expected PATTERN=NUMBER"),
        ([*rewrite, "--scale", "stem_out=fast"], "expected a number after '='"),
        ([*rewrite, "--scale", "re:stem(=0.1"], "invalid regular expression"),
        ([*rewrite, "--scale", "stem_out=inf"], "finite in float32"),
        ([*rewrite, "--multiplier", "stem_*=-1"], "Expected a multiplier >= 0"),
        (
            [*rewrite, "--scale", "blok1_out=0.1"],
            "Pattern 'blok1_out' matched no layer",
        ),
        ([*rewrite, "--scale", "re:blok.=0.1"], "matched no layer"),
        ([*rewrite], "one of the arguments --scale --multiplier --decay is required"),
        ([*rewrite, "--scale", "a=1", "--decay", "b=1"], "not allowed with"),
        ([*rewrite, "--scale", "a=1", "--scale", "a=2"], "'a' is given twice"),
        ([*rewrite, "--decay", "a=0.5", "--decay", "b=0.8"], "one factor D"),
        ([*rewrite, "--multiplier", "a=1", "--on-bypass", "warn"], "--on-bypass"),
        ([*rewrite, "--scale", "a=1", "--optimizer", "adam"], "--multiplier only"),
        (
            [*rewrite, "--multiplier", "stem_*=0.1", "--optimizer", "adamm"],
            "unknown optimizer 'adamm'; expected a Keras optimizer name, one of: ",
        ),
        (
            [*rewrite, "--multiplier", "stem_*=0.1", "--optimizer", "adamw"],
            "pass --mechanism gradient_scale or --mechanism reparametrize to accept",
        ),
        (
            [*rewrite, "--multiplier", "stem_*=0.1", "--optimizer", "adamw"],
            "multi_optimizer(model, multipliers, optimizer)` in Python",
        ),
        (
            [*rewrite, "--multiplier", "stem_*=0.1", "--mechanism", "reparametrize"],
            "--mechanism reparametrize needs --optimizer NAME",
        ),
        ([*rewrite, "--scale", "a=1", "--mechanism", "auto"], "--multiplier only"),
        ([*rewrite, "--decay", "a=0.5", "--no-stop-at-zero"], "--no-stop-at-zero"),
        ([*rewrite, "--scale", "a=1", "--on-bypass", "maybe"], "invalid choice"),
        ([], "the following arguments are required: COMMAND"),
        (["train"], "invalid choice: 'train'"),
    ]


def damaged_files(files, folder):
    """A truncated copy of a real file, random bytes, and zip archives whose
    config names a Python function or an unknown class."""
    truncated = folder / "truncated.keras"
    truncated.write_bytes(files.mlp.read_bytes()[:1000])
    noise = folder / "noise.keras"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with zipfile.ZipFile(files.mlp) as archive:
        config = json.loads(archive.read("config.json"))
    crafted = {}
    # A layer whose class is a function of another module, and a custom
    # class this process does not know: Keras's messages hold the whole
    # config, 2-4 KB of it.
    for name, layer in [
        ("unknown.keras", {"module": "os", "class_name": "system"}),
        (
            "unregistered.keras",
            {
                "module": "my_package",
                "class_name": "Mine",
                "registered_name": "my_package>Mine",
            },
        ),
    ]:
        changed = json.loads(json.dumps(config))
        changed["config"]["layers"][1].update(layer)
        crafted[name] = json.dumps(changed)
    for name, text in crafted.items():
        with zipfile.ZipFile(folder / name, "w") as archive:
            with zipfile.ZipFile(files.mlp) as original:
                for item in original.namelist():
                    if item != "config.json":
                        archive.writestr(item, original.read(item))
            archive.writestr("config.json", text)
    return truncated, noise, folder / "unknown.keras", folder / "unregistered.keras"


def test_damaged_and_crafted_files_get_one_short_line(files, tmp_path, capsys):
    truncated, noise, unknown, unregistered = damaged_files(files, tmp_path)
    for path in (truncated, noise):
        assert_error(
            run(capsys, "inspect", path),
            f"{path} is not a valid .keras file: it is not a zip archive",
            "Save the model again",
        )
    result = run(capsys, "inspect", unknown)
    assert_error(result, f"cannot load {unknown}: it refers to 'system'", "importing")
    result = run(capsys, "inspect", unregistered)
    assert_error(result, f"cannot load {unregistered}: it refers to 'Mine'")
    assert len(result[2]) < 300 + len(str(unregistered)), result[2]


def test_bad_input_exits_2_with_one_line(files, tmp_path, capsys):
    for argv, message in bad_input_cases(files, tmp_path):
        result = run(capsys, *argv)
        assert_error(result, message)
        assert result[1] == "", argv
        assert not (tmp_path / "out.keras").exists()


# help, version, docs


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"stopgrad-lr {stopgrad_lr.__version__}\n"


def test_the_docs_describe_every_command_and_option(capsys):
    page = DOCS.read_text("utf-8")
    for command in ([], ["inspect"], ["rewrite"], ["strip"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage: stopgrad-lr" in text
        for option in set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text)) - {"--help"}:
            assert option in page, f"docs/cli.md does not mention {option}"
        for name in command:
            assert f"stopgrad-lr {name}" in page


def test_the_on_bypass_and_mechanism_choices_are_the_librarys():
    from stopgrad_lr._rewrite import MECHANISMS, ON_BYPASS

    assert cli.ON_BYPASS == ON_BYPASS
    assert cli.MECHANISMS == MECHANISMS


@pytest.mark.parametrize("mechanism", ["gradient_scale", "reparametrize"])
def test_mechanism_accepts_what_auto_refuses(files, tmp_path, capsys, mechanism):
    # AdamW's weight decay: "auto" refuses, an explicit mechanism writes the
    # file and warns what the decay does, in the command's own terms.
    output = tmp_path / "out.keras"
    argv = ["rewrite", files.mlp, output, "--multiplier", "block1=0.25"]
    status, _, err = run(
        capsys, *argv, "--optimizer", "adamw", "--mechanism", mechanism
    )
    assert status == 0, err
    (line,) = err.splitlines()
    assert line.startswith("stopgrad-lr: warning: AdamW does not give")
    assert "weight_decay" in line
    assert_command_terms(line)
    rewritten = load(output)
    kinds = {type(layer).__name__ for layer in rewritten.layers}
    expected = "ParameterScale" if mechanism == "reparametrize" else "GradientScale"
    assert expected in kinds


def test_library_messages_in_command_terms():
    # Each library message the command can print, as the library says it.
    messages = {
        "or pass on_bypass='warn' or 'ignore' to insert it anyway.": (
            "or pass --on-bypass warn or --on-bypass ignore to insert it anyway."
        ),
        "or pass mechanism='gradient_scale' to accept": (
            "or pass --mechanism gradient_scale to accept"
        ),
        "or pass stop_at_zero=False for a GradientScale(0.0)": (
            "or pass --no-stop-at-zero for a GradientScale(0.0)"
        ),
        "as apply_lr_multipliers(..., mechanism='reparametrize') puts it.": (
            "as `stopgrad-lr rewrite --multiplier ... --mechanism reparametrize` "
            "puts it."
        ),
        "Fix: `stopgrad_lr.apply_lr_multipliers(model, multipliers, optimizer=...)` "
        "with mechanism='reparametrize' rewrites": (
            "Fix: --optimizer NAME --mechanism reparametrize rewrites"
        ),
        "fold the scales back with `stopgrad_lr.strip_gradient_scales(model)`, then": (
            "fold the scales back with `stopgrad-lr strip`, then"
        ),
        "report:\n- a problem.\nstopgrad_lr.check_optimizer(optimizer, model) "
        "repeats this report; warnings.filterwarnings('ignore', category=stopgrad_lr."
        "OptimizerMismatchWarning) silences it.": "report:\n- a problem.",
    }
    for library, command in messages.items():
        assert cli.in_command_terms(library) == command


def test_a_model_that_already_holds_stopgrad_lr_layers(files, tmp_path, capsys):
    # Multipliers are absolute: the library refuses a second pass over a
    # model with scales and says how to start afresh; the command says so in
    # one line, exit 2.
    tuned = tmp_path / "tuned.keras"
    assert run(capsys, "rewrite", files.mlp, tuned, "--scale", "block1=0.5")[0] == 0
    output = tmp_path / "out.keras"
    result = run(capsys, "rewrite", tuned, output, "--multiplier", "block1=0.1")
    assert_error(result, "already holds", "`stopgrad-lr strip IN.keras", status=2)
    assert not output.exists()


def test_keras_hub_backbone_files(tmp_path, capsys):
    backbone = _models.bert_backbone()
    source, tuned, plain = (tmp_path / f"{n}.keras" for n in ("bert", "tuned", "plain"))
    backbone.save(source)
    # Subprocesses: the command must import keras-hub itself to read them.
    result = run_command("inspect", source)
    assert result.returncode == 0, result.stderr
    assert "transformer_layer_1" in result.stdout
    assert "TransformerEncoder" in result.stdout
    result = run_command("rewrite", source, tuned, "--decay", "auto=0.5")
    assert result.returncode == 0, result.stderr
    # The embedding stage and 2 layers below the pooler: 3 boundaries.
    assert "Learning-rate levels: 4 multipliers, 1 down to 0.125" in result.stdout
    result = run_command("strip", tuned, plain)
    assert result.returncode == 0, result.stderr

    data = {
        "token_ids": np.arange(1, 9, dtype="int32")[None].repeat(2, 0),
        "segment_ids": np.zeros((2, 8), "int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    multipliers = effective_multipliers(load(tuned))
    assert multipliers["transformer_layer_1"] == 0.5
    assert multipliers["token_embedding"] == 0.5**3
    expected = keras.tree.flatten(backbone(data))
    for path in (tuned, plain):
        got = keras.tree.flatten(load(path)(data))
        assert all(
            np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
            for a, b in zip(got, expected, strict=True)
        )
    assert not scale_layers(load(plain))


def test_a_keras_hub_layer_that_cannot_be_rebuilt_is_bad_input(tmp_path, capsys):
    # DeiT's backbone saves and loads, but its layers' get_config fails
    # outside it, as Llama3's, Qwen3's... do or their from_config: a written
    # file could not be read back.
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.DeiTBackbone(
        image_shape=(16, 16, 3),
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
    )
    source, output = tmp_path / "deit.keras", tmp_path / "out.keras"
    backbone.save(source)
    for argv in (["strip"], ["rewrite", "--scale", "deit_encoder=0.5"]):
        result = run(capsys, argv[0], source, output, *argv[1:])
        assert_error(
            result,
            "cannot write the model: its layer 'deit_patching_and_embedding' "
            "(keras_hub.DeiTEmbeddings) cannot be rebuilt from a file",
            "a limitation of keras_hub",
        )
        assert sorted(os.listdir(tmp_path)) == ["deit.keras"]


# Start-up: --help without Keras; real errors still shown


def imported_packages(result):
    """The top-level packages `python -X importtime` reports."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize(
    ("argv", "status"),
    [(["--help"], 0), (["rewrite", "--help"], 0), (["rewrite", "in.keras"], 2)],
)
def test_help_and_argument_errors_import_neither_keras_nor_tensorflow(argv, status):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stopgrad_lr", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == status
    packages = imported_packages(result)
    assert "stopgrad_lr" in packages and "argparse" in packages
    assert not packages & {"keras", "tensorflow", "jax", "torch", "numpy"}


def test_a_backend_that_does_not_exist_is_bad_input(files):
    result = run_command("inspect", files.mlp, env={"KERAS_BACKEND": "no_such"})
    assert_one_error_line(
        result,
        "Keras has no backend 'no_such'",
        "set KERAS_BACKEND to one of tensorflow, jax, torch",
    )


# Makes `import tensorflow` fail as it does where TensorFlow is not installed.
WITHOUT_TENSORFLOW = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
"""


@pytest.mark.parametrize("command", ["inspect", "rewrite", "strip"])
def test_a_backend_that_is_not_installed_says_what_to_install(files, tmp_path, command):
    (tmp_path / "sitecustomize.py").write_text(WITHOUT_TENSORFLOW)
    environment = {
        key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"
    }
    argv = {
        "inspect": [files.mlp],
        "rewrite": [files.mlp, tmp_path / "out.keras", "--scale", "block1=0.5"],
        "strip": [files.mlp, tmp_path / "out.keras"],
    }[command]
    result = subprocess.run(
        [sys.executable, "-m", "stopgrad_lr", command, *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**environment, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        timeout=300,
    )
    assert_one_error_line(
        result,
        "KERAS_BACKEND is unset, so Keras uses tensorflow",
        "which is not installed",
        "pip install 'stopgrad-lr[tensorflow]'",
        "or set KERAS_BACKEND to a backend you have installed",
    )
    assert not (tmp_path / "out.keras").exists()


def test_a_named_backend_that_is_not_installed(monkeypatch):
    # jax and torch are installed here: the message of a missing one, as the
    # import would raise it.
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    message = cli._backend_error(
        ModuleNotFoundError("No module named 'jax'", name="jax")
    )
    assert message.startswith("Keras cannot start its backend: KERAS_BACKEND=jax, ")
    assert "which is not installed. Install it (pip install jax)" in message


def test_an_unwritable_folder_is_one_line_and_status_1(files, tmp_path):
    # Permissions do not stop root; sysfs refuses new files even to root (and
    # it is the case the command cannot see coming: it fails at the save).
    if os.geteuid() == 0:
        folder = Path("/sys")
    else:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o555)
    before = sorted(os.listdir(folder))
    result = run_command("strip", files.mlp, folder / "out.keras")
    assert_one_error_line(result, "cannot write", "Permission denied", status=1)
    assert sorted(os.listdir(folder)) == before


# Signals during a save


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """ResNet50 without pretrained weights: a 100 MB file whose save takes
    long enough to interrupt."""
    path = tmp_path_factory.mktemp("resnet") / "resnet50.keras"
    keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3)).save(path)
    return path


@pytest.mark.parametrize(
    ("number", "status", "line"),
    [
        (signal.SIGTERM, 143, "stopgrad-lr: terminated by SIGTERM"),
        (signal.SIGINT, 130, "stopgrad-lr: interrupted by SIGINT"),
    ],
)
def test_a_signal_during_the_save_leaves_nothing_behind(
    resnet50_file, tmp_path, number, status, line
):
    target = tmp_path / "out.keras"
    environment = {
        key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "stopgrad_lr", "strip", str(resnet50_file), str(target)],
        cwd=ROOT,
        env={**environment, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Signal once the temporary file has its first bytes: Keras is then
        # writing the archive, which for ResNet50 takes seconds.
        deadline = time.monotonic() + 240
        while not any(
            path.name.startswith(".out.keras.") and path.stat().st_size > 0
            for path in tmp_path.iterdir()
        ):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.01)
        process.send_signal(number)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status, err
    assert err.splitlines() == [line]
    assert out == ""
    assert list(tmp_path.iterdir()) == []
