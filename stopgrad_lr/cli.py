"""The `stopgrad-lr` command: inspect, rewrite and strip `.keras` files.

`stopgrad-lr inspect`, `rewrite` and `strip` wrap `stopgrad_lr.summary`,
`insert_gradient_scales` / `apply_lr_multipliers` / `layerwise_decay` and
`strip_gradient_scales` for models saved in Keras's native `.keras` format;
`stopgrad-lr demo` runs the fine-tuning demo of the source repository.
`python -m stopgrad_lr` is the same command.

Models are loaded in Keras's safe mode, output files are written atomically
and never over the input, and bad input ends the command with a one-line
error and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import keras

from stopgrad_lr import __version__
from stopgrad_lr._graph import summary
from stopgrad_lr._patterns import Pattern, iter_layers
from stopgrad_lr._rewrite import (
    ON_BYPASS,
    apply_lr_multipliers,
    insert_gradient_scales,
    layerwise_decay,
    strip_gradient_scales,
)

PROG = "stopgrad-lr"
# A pattern with this prefix is a regular expression; any other is a glob.
REGEX_PREFIX = "re:"
# Bad input (arguments, files, patterns) exits like an argparse usage error;
# a failure to write the output or to start the demo exits with 1.
BAD_INPUT = 2
FAILURE = 1
# The demo lives in the source repository, next to the package; an installed
# wheel does not ship it.
DEMO_SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "finetune_digits.py"
DEMO_MODULES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
REWRITE_KINDS = ("scale", "multiplier", "decay")


class CommandError(Exception):
    """An error the user can fix: printed as one line, without a traceback."""

    def __init__(self, message: str, status: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one `CommandError` line, not usage
    text and `SystemExit`."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `stopgrad-lr` command and returns its exit status.

    Prints a one-line error to stderr and returns 2 on bad input (a missing
    or non-`.keras` file, a bad `PATTERN=VALUE`, a pattern that matches no
    layer, an output that exists or is the input without `--force`, a file
    that safe mode refuses without `--unsafe`), and returns 1 when the output
    cannot be written or the demo cannot start. `--help` and `--version`
    exit through `SystemExit`, as in any argparse program. See the CLI page
    of the docs for every command and option.

    Args:
        argv: The arguments, without the program name. Defaults to
            `sys.argv[1:]`.

    Returns:
        The exit status: 0 on success, 1 or 2 on error, or the demo's own.

    Examples:
        >>> import os, tempfile, keras
        >>> from stopgrad_lr.cli import main
        >>> directory = tempfile.TemporaryDirectory()
        >>> path = os.path.join(directory.name, "model.keras")
        >>> head = keras.layers.Dense(2, name="head")
        >>> keras.Sequential([keras.Input((4,)), head]).save(path)
        >>> main(["inspect", path])
        Layer  Type   Trainable params  Cut  Multiplier
        head   Dense                10  yes           1
        Total trainable params: 10
        0
        >>> directory.cleanup()
    """
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "demo":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        handler: Callable[[argparse.Namespace, list[str]], int] = args.handler
        return handler(args, extra)
    except CommandError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return error.status


# Arguments ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Per-block learning rates for Keras models saved as .keras "
        "files: inspect them, insert or remove gradient scales.",
        epilog=f"Patterns are globs matched against the whole layer name or its "
        f"path 'outer/inner' in a nested model; prefix a pattern with "
        f"'{REGEX_PREFIX}' for a regular expression that must match the whole "
        f"name. Quote patterns so the shell does not expand them.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="print each layer's cut status and effective multiplier",
        description="Print each layer of a .keras model with its type, trainable "
        "parameters, whether it is a cut, and its effective learning-rate "
        "multiplier (stopgrad_lr.summary).",
    )
    inspect.add_argument("model", metavar="MODEL.keras")
    _add_unsafe(inspect)
    inspect.set_defaults(handler=_inspect)

    rewrite = commands.add_parser(
        "rewrite",
        help="insert gradient scales by layer-name pattern",
        description="Load IN.keras, insert gradient scales, save OUT.keras and "
        "print the new model's summary. Give one kind of option, repeated as "
        "needed: --scale, --multiplier or --decay. The output is not compiled.",
    )
    rewrite.add_argument("input", metavar="IN.keras")
    rewrite.add_argument("output", metavar="OUT.keras")
    kinds = rewrite.add_mutually_exclusive_group(required=True)
    kinds.add_argument(
        "--scale",
        action="append",
        type=_assignment,
        metavar="PATTERN=K",
        help="a gradient scale K after each matching layer "
        "(stopgrad_lr.insert_gradient_scales); repeatable",
    )
    kinds.add_argument(
        "--multiplier",
        action="append",
        type=_assignment,
        metavar="PATTERN=M",
        help="the effective multiplier M for the matching layers, scales placed "
        "at the cuts between groups (stopgrad_lr.apply_lr_multipliers); "
        "repeatable",
    )
    kinds.add_argument(
        "--decay",
        action="append",
        type=_assignment,
        metavar="PATTERN=D",
        help="layer-wise decay: a scale D after each matching block output "
        "(stopgrad_lr.layerwise_decay); repeatable, with one D for all",
    )
    rewrite.add_argument(
        "--on-bypass",
        choices=ON_BYPASS,
        help="with --scale or --decay, what to do when a matched layer is not a "
        "cut: error (default), warn or ignore",
    )
    rewrite.add_argument(
        "--no-stop-at-zero",
        dest="stop_at_zero",
        action="store_false",
        help="with --scale or --multiplier, insert GradientScale(0.0) rather "
        "than GradientStop for a zero, so a ScaleSchedule can raise it later",
    )
    rewrite.add_argument(
        "--optimizer",
        metavar="NAME",
        help="with --multiplier, the optimizer you will train with, by its Keras "
        "name with default settings (sgd, adam, lion...): chooses the mechanism "
        "that is a learning-rate multiplier for it, gradient scales or "
        "reparametrisation (apply_lr_multipliers(optimizer=...))",
    )
    _add_output_options(rewrite)
    rewrite.set_defaults(handler=_rewrite)

    strip = commands.add_parser(
        "strip",
        help="remove every stopgrad_lr layer, for deployment",
        description="Load IN.keras and save OUT.keras without any stopgrad_lr "
        "layer: same outputs, and the file loads without stopgrad_lr.",
    )
    strip.add_argument("input", metavar="IN.keras")
    strip.add_argument("output", metavar="OUT.keras")
    _add_output_options(strip)
    strip.set_defaults(handler=_strip)

    demo = commands.add_parser(
        "demo",
        help="run the fine-tuning demo of the source repository",
        description="Run examples/finetune_digits.py from the source repository "
        "(what `make demo` runs), passing on any further arguments. Needs the "
        "examples extra: scikit-learn and matplotlib.",
    )
    demo.set_defaults(handler=_demo)
    return parser


def _add_unsafe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="load files that run Python code when loaded, such as a Lambda "
        "layer's function (Keras's safe_mode=False); only for files you trust",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT.keras if it exists, even when it is IN.keras",
    )
    _add_unsafe(parser)


def _assignment(text: str) -> tuple[str, Pattern, float]:
    """Parses `PATTERN=NUMBER` into (text, pattern, value) for argparse."""
    # The value is a number and has no '='; a regex may.
    raw_pattern, equals, raw_value = text.rpartition("=")
    if not equals or not raw_pattern:
        raise argparse.ArgumentTypeError(
            f"expected PATTERN=NUMBER, such as 'conv2_*=0.1'. Received: {text!r}"
        )
    try:
        value = float(raw_value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number after '=' in {text!r}. Received: {raw_value!r}"
        ) from None
    return raw_pattern, _pattern(raw_pattern), value


def _pattern(text: str) -> Pattern:
    if not text.startswith(REGEX_PREFIX):
        return text
    try:
        return re.compile(text.removeprefix(REGEX_PREFIX))
    except re.error as error:
        raise argparse.ArgumentTypeError(
            f"invalid regular expression in {text!r}: {error}"
        ) from None


def _patterns(
    assignments: list[tuple[str, Pattern, float]], option: str
) -> dict[Pattern, float]:
    chosen: dict[Pattern, float] = {}
    for text, pattern, value in assignments:
        if pattern in chosen:
            raise CommandError(f"pattern {text!r} is given twice to {option}")
        chosen[pattern] = value
    return chosen


# Commands -------------------------------------------------------------------


def _inspect(args: argparse.Namespace, extra: list[str]) -> int:
    model = _load(args.model, args.unsafe)
    with _library_errors():
        summary(model)
    return 0


def _rewrite(args: argparse.Namespace, extra: list[str]) -> int:
    (kind,) = [kind for kind in REWRITE_KINDS if getattr(args, kind)]
    patterns = _patterns(getattr(args, kind), f"--{kind}")
    if args.on_bypass is not None and kind == "multiplier":
        raise CommandError(
            "--on-bypass applies to --scale and --decay only: --multiplier "
            "places its scales at cuts, and refuses groups no cut separates"
        )
    if not args.stop_at_zero and kind == "decay":
        raise CommandError(
            "--no-stop-at-zero applies to --scale and --multiplier only: a "
            "--decay factor is never 0"
        )
    if args.optimizer is not None and kind != "multiplier":
        raise CommandError(
            "--optimizer applies to --multiplier only: --scale and --decay insert "
            "gradient scales whatever the optimizer"
        )
    factors = sorted(set(patterns.values()))
    if kind == "decay" and len(factors) > 1:
        raise CommandError(
            f"--decay takes one factor D for all its patterns (the block i "
            f"boundaries below the head trains at D**i times the base rate); "
            f"received {factors}. Use --scale for different scales."
        )
    target = _check_output(args.input, args.output, args.force)
    model = _load(args.input, args.unsafe)
    with _library_errors():
        new_model = _rewritten(model, kind, patterns, args)
    _save_atomically(new_model, target)
    summary(new_model)
    print(f"Wrote {args.output}.")
    return 0


def _rewritten(
    model: keras.Model,
    kind: str,
    patterns: dict[Pattern, float],
    args: argparse.Namespace,
) -> keras.Model:
    on_bypass = args.on_bypass or "error"
    if kind == "scale":
        return insert_gradient_scales(
            model, patterns, on_bypass=on_bypass, stop_at_zero=args.stop_at_zero
        )
    if kind == "multiplier":
        optimizer = None if args.optimizer is None else _optimizer(args.optimizer)
        return apply_lr_multipliers(
            model, patterns, optimizer=optimizer, stop_at_zero=args.stop_at_zero
        )
    (decay,) = set(patterns.values())
    return layerwise_decay(model, list(patterns), decay, on_bypass=on_bypass)


def _optimizer(name: str) -> keras.optimizers.Optimizer:
    try:
        return keras.optimizers.get(name)
    except ValueError:
        known = sorted(
            attribute.lower()
            for attribute in dir(keras.optimizers)
            if isinstance(getattr(keras.optimizers, attribute), type)
            and issubclass(getattr(keras.optimizers, attribute), keras.Optimizer)
            and attribute not in ("Optimizer", "LossScaleOptimizer", "MultiOptimizer")
        )
        raise CommandError(
            f"--optimizer: unknown optimizer {name!r}; expected a Keras optimizer "
            f"name, one of: {', '.join(known)}"
        ) from None


def _strip(args: argparse.Namespace, extra: list[str]) -> int:
    target = _check_output(args.input, args.output, args.force)
    model = _load(args.input, args.unsafe)
    with _library_errors():
        stripped = strip_gradient_scales(model)
    _save_atomically(stripped, target)
    removed = _count_own_layers(model)
    layers = "layer" if removed == 1 else "layers"
    print(f"Wrote {args.output}: removed {removed} stopgrad_lr {layers}.")
    return 0


def _demo(args: argparse.Namespace, extra: list[str]) -> int:
    if not DEMO_SCRIPT.is_file():
        raise CommandError(
            f"the demo script {DEMO_SCRIPT} is not there: the demo ships with the "
            f"source repository, not with the installed package. Run `make demo` "
            f"in a checkout of the repository.",
            status=FAILURE,
        )
    missing = [
        package
        for module, package in DEMO_MODULES.items()
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise CommandError(
            f"the demo needs {' and '.join(missing)}: install the examples "
            f"extra with `pip install -e '.[examples]'` in the repository",
            status=FAILURE,
        )
    # `demo -- --help` passes --help on to the script rather than to argparse.
    arguments = extra[1:] if extra[:1] == ["--"] else extra
    return subprocess.run([sys.executable, str(DEMO_SCRIPT), *arguments]).returncode


# Files ----------------------------------------------------------------------


def _check_input(path: str) -> None:
    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file")
    if not os.path.isfile(path) or not path.endswith(".keras"):
        raise CommandError(
            f"{path} is not a .keras file, the format `model.save('name.keras')` "
            f"writes. Re-save older .h5 or SavedModel files in Keras 3 first."
        )


def _check_output(source: str, output: str, force: bool) -> str:
    """Checks where the output goes, before any work; returns the file to
    replace (the target of `output` if it is a symbolic link)."""
    _check_input(source)
    if not output.endswith(".keras"):
        raise CommandError(f"{output}: the output must end with .keras")
    target = os.path.realpath(output)
    if not os.path.isdir(os.path.dirname(target)):
        raise CommandError(f"{output}: no such directory")
    if os.path.isdir(target):
        raise CommandError(f"{output} is a directory")
    if os.path.exists(target) and not force:
        if os.path.samefile(source, target):
            raise CommandError(
                f"{output} is the input file; pass --force to replace it"
            )
        raise CommandError(f"{output} exists; pass --force to replace it")
    return target


def _load(path: str, unsafe: bool) -> keras.Model:
    _check_input(path)
    try:
        # Not compiled: a rewrite returns an uncompiled model anyway, and the
        # loss or optimizer may be custom objects this process cannot load.
        return keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as error:
        # Keras raises a plain ValueError for what safe mode refuses; its
        # message is the only thing that tells it apart.
        if "safe_mode=False" in str(error):
            raise CommandError(
                f"{path} holds Python code that loading would run (such as a "
                f"Lambda layer's function), which Keras's safe mode refuses. If "
                f"you trust the file, pass --unsafe."
            ) from None
        # Any failure to read a file the user named is bad input.
        raise CommandError(
            f"cannot load {path}: {type(error).__name__}: {error}"
        ) from None


def _save_atomically(model: keras.Model, target: str) -> None:
    """Saves to a temporary file beside `target`, then renames it over
    `target`: a reader sees the old file or the new one, never a part."""
    mode = (
        stat.S_IMODE(os.stat(target).st_mode)
        if os.path.exists(target)
        else 0o666 & ~_umask()
    )
    # Keras saves only to names that end with .keras.
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(target)}.",
        suffix=".keras",
        dir=os.path.dirname(target),
    )
    os.close(descriptor)
    try:
        keras.saving.save_model(model, temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except OSError as error:
        raise CommandError(f"cannot write {target}: {error}", status=FAILURE) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def _umask() -> int:
    # The umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Helpers --------------------------------------------------------------------


@contextlib.contextmanager
def _library_errors() -> Iterator[None]:
    """Turns the library's ValueErrors (bad patterns, values, models) into
    one-line errors, and its warnings into one-line warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        except ValueError as error:
            raise CommandError(str(error)) from None
        finally:
            for warning in caught:
                print(f"{PROG}: warning: {_one_line(warning.message)}", file=sys.stderr)


def _count_own_layers(model: keras.Model) -> int:
    """How many layers of this package (registered under `stopgrad_lr>`)."""
    return sum(
        keras.saving.get_registered_name(type(layer)).startswith("stopgrad_lr>")
        for _, layer in iter_layers(model)
    )


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())
