"""The `stopgrad-lr` command: inspect, rewrite and strip `.keras` files.

`stopgrad-lr inspect`, `rewrite` and `strip` wrap `stopgrad_lr.summary`,
`insert_gradient_scales` / `apply_lr_multipliers` / `layerwise_decay` and
`strip_gradient_scales` for models saved in Keras's native `.keras` format.
`python -m stopgrad_lr` is the same command.

Models are loaded in Keras's safe mode, output files are written atomically
and never over an existing file without `--force`, and every error ends the
command with one line on stderr and a documented exit status (2 for bad
input), never a traceback unless `--verbose`.

Keras, and with it TensorFlow, is imported only once a command needs it, so
that `--help` and argument errors answer at once; its start-up log lines are
hidden unless `--verbose`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from stopgrad_lr import __version__

if TYPE_CHECKING:
    import keras

    # What the library's functions take as a layer-name pattern.
    Pattern = str | re.Pattern[str]

PROG = "stopgrad-lr"
# A pattern with this prefix is a regular expression; any other is a glob.
REGEX_PREFIX = "re:"
# Exit statuses, listed in docs/cli.md. Bad input (arguments, files,
# patterns) exits like an argparse usage error; a failure to write the output,
# or an error inside Keras or this package, exits with 1; a signal exits with
# 128 + its number, as a shell reports it.
BAD_INPUT = 2
FAILURE = 1
INTERRUPTED = 128 + signal.SIGINT  # 130
TERMINATED = 128 + signal.SIGTERM  # 143
REWRITE_KINDS = ("scale", "multiplier", "decay")
# stopgrad_lr._rewrite.ON_BYPASS, repeated so that building the parser does
# not import Keras (a test checks that the two agree).
ON_BYPASS = ("error", "warn", "ignore")
# stopgrad_lr._rewrite.MECHANISMS, repeated for the same reason.
MECHANISMS = ("auto", "gradient_scale", "reparametrize")
# Keras's backends, and what to install for each (KERAS_BACKEND names one).
BACKEND_INSTALLS = {
    "tensorflow": "pip install 'stopgrad-lr[tensorflow]'",
    "jax": "pip install jax",
    "torch": "pip install torch",
    "numpy": "nothing: NumPy comes with Keras (inference only, it cannot train)",
    "openvino": "pip install openvino (inference only, it cannot train)",
}
# The longest file name that Linux, macOS and Windows file systems allow.
NAME_MAX = 255
# Error messages from Keras can hold a whole model config; one line of the
# command's output keeps this many characters of them.
MESSAGE_LIMIT = 300


class CommandError(Exception):
    """An error the user can fix: printed as one line, without a traceback."""

    def __init__(self, message: str, status: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.status = status


class _Terminated(BaseException):
    """Raised on SIGTERM, so that cleanup (`finally`) runs as for Ctrl-C's
    KeyboardInterrupt. A BaseException: no `except Exception` swallows it."""


# The signals received during this run of `main`. Code that catches every
# exception can swallow the one a handler raises (Keras's save does, around
# choosing where to buffer the weights), so the command checks this list
# again after each long step.
_received: list[int] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    _raise_if_signalled()


def _raise_if_signalled() -> None:
    if signal.SIGTERM in _received:
        raise _Terminated
    if signal.SIGINT in _received:
        raise KeyboardInterrupt


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one `CommandError` line, not usage
    text and `SystemExit`."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `stopgrad-lr` command and returns its exit status.

    Prints a one-line error to stderr and returns 2 on bad input (a missing,
    corrupt or non-`.keras` file, a bad `PATTERN=VALUE`, a pattern that
    matches no layer, a model the library refuses, an output that exists or
    is the input without `--force`, a file that safe mode refuses without
    `--unsafe`); returns 1 when the output cannot be written or on an
    unexpected error (with its traceback only under `--verbose`); returns
    130 on SIGINT (Ctrl-C) and 143 on SIGTERM, after removing any partly
    written file. `--help` and `--version` exit through `SystemExit`, as in
    any argparse program. See the CLI page of the docs for every command
    and option.

    Args:
        argv: The arguments, without the program name. Defaults to
            `sys.argv[1:]`.

    Returns:
        The exit status: 0 on success, 1 or 2 on error, 130 or 143 when
        interrupted.

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
    verbose = False
    _received.clear()
    # Only the main thread may set handlers; elsewhere, signals stay as they are.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {
        number: signal.signal(number, _on_signal)
        for number in (signal.SIGINT, signal.SIGTERM)
        if in_main_thread
    }
    try:
        args = parser.parse_args(argv)
        verbose = args.verbose
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except CommandError as error:
        _print_error(error)
        return error.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted by SIGINT", file=sys.stderr)
        return INTERRUPTED
    except _Terminated:
        print(f"{PROG}: terminated by SIGTERM", file=sys.stderr)
        return TERMINATED
    except Exception as error:
        # A bug, here or in Keras: still one line, unless asked for more.
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (rerun with --verbose for the traceback)"
        _print_error(f"unexpected {type(error).__name__}: {_shortened(error)}{hint}")
        return FAILURE
    finally:
        for number, previous_handler in previous.items():
            # None: a handler set outside Python, which cannot be put back.
            if previous_handler is not None:
                signal.signal(number, previous_handler)


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
    _add_verbose(inspect)
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
        help="with --scale or --multiplier, insert GradientScale(0.0) for a zero "
        "rather than freeze what lies upstream (a GradientStop and frozen "
        "copies), so a ScaleSchedule can raise it later",
    )
    rewrite.add_argument(
        "--optimizer",
        metavar="NAME",
        help="with --multiplier, the optimizer you will train with, by its Keras "
        "name with default settings (sgd, adam, lion...): chooses the mechanism "
        "that is a learning-rate multiplier for it, gradient scales or "
        "reparametrisation (apply_lr_multipliers(optimizer=...))",
    )
    rewrite.add_argument(
        "--mechanism",
        choices=MECHANISMS,
        help="with --multiplier, how the multipliers are given: auto (default: "
        "gradient scales, or with --optimizer what is a multiplier for it), "
        "gradient_scale, or reparametrize (needs --optimizer) "
        "(apply_lr_multipliers(mechanism=...))",
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

    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the backend's start-up log lines and, on an unexpected "
        "error, the Python traceback",
    )


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
    _add_verbose(parser)


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


def _inspect(args: argparse.Namespace) -> int:
    model = _load(args.model, args.unsafe, args.verbose)
    import stopgrad_lr

    with _library_errors():
        stopgrad_lr.summary(model)
    return 0


def _rewrite(args: argparse.Namespace) -> int:
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
    if args.mechanism is not None and kind != "multiplier":
        raise CommandError(
            "--mechanism applies to --multiplier only: --scale and --decay insert "
            "gradient scales"
        )
    if args.mechanism == "reparametrize" and args.optimizer is None:
        raise CommandError(
            "--mechanism reparametrize needs --optimizer NAME: the output scale "
            "depends on the optimizer you will train with (c = m for Adam-like "
            "optimizers, c = sqrt(m) for SGD)"
        )
    factors = sorted(set(patterns.values()))
    if kind == "decay" and len(factors) > 1:
        raise CommandError(
            f"--decay takes one factor D for all its patterns (a block with i "
            f"boundaries between it and the head trains at D**i times the base "
            f"rate); "
            f"received {factors}. Use --scale for different scales."
        )
    target = _check_output(args.input, args.output, args.force)
    model = _load(args.input, args.unsafe, args.verbose)
    from stopgrad_lr import summary

    with _library_errors():
        new_model = _rewritten(model, kind, patterns, args)
    _save_atomically(new_model, target, args.output, args.force)
    summary(new_model)
    print(f"Wrote {args.output}.")
    return 0


def _rewritten(
    model: keras.Model,
    kind: str,
    patterns: dict[Pattern, float],
    args: argparse.Namespace,
) -> keras.Model:
    from stopgrad_lr import (
        apply_lr_multipliers,
        insert_gradient_scales,
        layerwise_decay,
    )

    on_bypass = args.on_bypass or "error"
    if kind == "scale":
        return insert_gradient_scales(
            model, patterns, on_bypass=on_bypass, stop_at_zero=args.stop_at_zero
        )
    if kind == "multiplier":
        optimizer = None if args.optimizer is None else _optimizer(args.optimizer)
        return apply_lr_multipliers(
            model,
            patterns,
            optimizer=optimizer,
            mechanism=args.mechanism or "auto",
            stop_at_zero=args.stop_at_zero,
        )
    (decay,) = set(patterns.values())
    boundaries = list(patterns)
    return layerwise_decay(
        model,
        "auto" if boundaries == ["auto"] else boundaries,
        decay,
        on_bypass=on_bypass,
    )


def _optimizer(name: str) -> keras.optimizers.Optimizer:
    import keras

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


def _strip(args: argparse.Namespace) -> int:
    target = _check_output(args.input, args.output, args.force)
    model = _load(args.input, args.unsafe, args.verbose)
    from stopgrad_lr import strip_gradient_scales

    with _library_errors():
        stripped = strip_gradient_scales(model)
    _save_atomically(stripped, target, args.output, args.force)
    removed = _count_own_layers(model)
    layers = "layer" if removed == 1 else "layers"
    print(f"Wrote {args.output}: removed {removed} stopgrad_lr {layers}.")
    return 0


# Files ----------------------------------------------------------------------


def _check_input(path: str) -> None:
    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file")
    if not os.path.isfile(path) or not path.endswith(".keras"):
        raise CommandError(
            f"{path} is not a .keras file, the format `model.save('name.keras')` "
            f"writes. Re-save older .h5 or SavedModel files in Keras 3 first."
        )
    # Keras reports a file that is not a zip archive as "File not found".
    if not zipfile.is_zipfile(path):
        raise CommandError(
            f"{path} is not a valid .keras file: it is not a zip archive (a "
            f"truncated download or copy, or another format renamed). Save the "
            f"model again with `model.save('name.keras')`."
        )


def _check_output(source: str, output: str, force: bool) -> str:
    """Checks where the output goes, before any work; returns the file to
    write (the target of `output` if it is a symbolic link).

    The checks are repeated where it matters, at the end: a file that
    appears at the target meanwhile is not replaced without `force`."""
    _check_input(source)
    if not output.endswith(".keras"):
        raise CommandError(f"{output}: the output must end with .keras")
    broken_link = os.path.islink(output) and not os.path.exists(output)
    # A link that leads nowhere (dangling, or a loop) is itself what
    # --force replaces; any other link is followed.
    target = os.path.abspath(output) if broken_link else os.path.realpath(output)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise CommandError(f"{output}: no such directory")
    if os.path.isdir(target):
        raise CommandError(f"{output} is a directory")
    if broken_link and not force:
        raise CommandError(
            f"{output} exists, as a symbolic link that leads to no file (it "
            f"dangles or loops); pass --force to replace the link with the file"
        )
    if os.path.exists(target) and not force:
        if os.path.samefile(source, target):
            raise CommandError(
                f"{output} is the input file; pass --force to replace it"
            )
        raise CommandError(f"{output} exists; pass --force to replace it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(
            f"cannot write {output}: Permission denied to create files in "
            f"{folder}; choose another folder",
            status=FAILURE,
        )
    return target


def _load(path: str, unsafe: bool, verbose: bool) -> keras.Model:
    _check_input(path)
    keras = _import_keras(verbose)
    _import_keras_hub_if_used(path)
    try:
        # Not compiled: a rewrite returns an uncompiled model anyway, and the
        # loss or optimizer may be custom objects this process cannot load.
        model = keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as error:
        raise CommandError(_load_error(path, error)) from None
    _raise_if_signalled()
    return model


def _import_keras_hub_if_used(path: str) -> None:
    """keras-hub registers its layers and models with Keras when imported; a
    file that holds them (a keras-hub backbone, or one rewritten by this
    command) loads only after that. Imported only for such a file: it takes
    seconds."""
    try:
        with zipfile.ZipFile(path) as archive:
            uses_keras_hub = b'"keras_hub' in archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        return  # load_model says what is wrong with the file
    if uses_keras_hub:
        with contextlib.suppress(ImportError):
            import keras_hub  # noqa: F401


def _load_error(path: str, error: BaseException) -> str:
    """One line for a file that does not load: any failure to read a file
    the user named is bad input.

    Keras wraps the error that matters (safe mode, an unknown class) in
    others, and appends the whole model config to its messages: the line
    looks through the chain and keeps the messages' first part."""
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    messages = [str(link) for link in chain]
    # Keras raises a plain ValueError for what safe mode refuses; its message
    # is the only thing that tells it apart.
    if any("safe_mode" in message for message in messages):
        return (
            f"{path} holds Python code that loading would run (such as a "
            f"Lambda layer's function), which Keras's safe mode refuses. If "
            f"you trust the file, pass --unsafe."
        )
    for message in messages:
        unknown = re.search(r"Could not locate \w+ '([^']+)'", message)
        if unknown:
            return (
                f"cannot load {path}: it refers to {unknown.group(1)!r}, which is "
                f"neither a Keras object nor one of stopgrad_lr's. This command "
                f"loads only models made of those; load models with custom "
                f"layers in Python, after importing the code that defines them."
            )
    first = re.split(r"Full object config|config=|\n\s*\n", messages[0])[0]
    return f"cannot load {path}: {type(error).__name__}: {_shortened(first)}"


def _save_atomically(model: keras.Model, target: str, output: str, force: bool) -> None:
    """Saves to a temporary file beside `target`, then moves it to `target`:
    a reader sees the old file or the new one, never a part. Without
    `force`, the move refuses a `target` that exists by then.

    The temporary file is removed on any failure and on SIGINT or SIGTERM
    (which `main` turns into exceptions)."""
    import keras

    mode = (
        stat.S_IMODE(os.stat(target).st_mode)
        if os.path.exists(target)
        else 0o666 & ~_umask()
    )
    _check_serializable(model)
    temporary = None
    try:
        # Keras saves only to names that end with .keras.
        descriptor, temporary = tempfile.mkstemp(
            prefix=_temporary_prefix(os.path.basename(target)),
            suffix=".keras",
            dir=os.path.dirname(target),
        )
        os.close(descriptor)
        keras.saving.save_model(model, temporary)
        _raise_if_signalled()
        os.chmod(temporary, mode)
        if force:
            os.replace(temporary, target)
        else:
            _move_without_replacing(temporary, target)
    except FileExistsError:
        raise CommandError(
            f"{output} was created by someone else while this command ran; it "
            f"was left as it is. Pass --force to replace it."
        ) from None
    except OSError as error:
        # strerror: the error's filename would be the temporary file's.
        reason = error.strerror or str(error)
        raise CommandError(f"cannot write {output}: {reason}", status=FAILURE) from None
    finally:
        if temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)


def _temporary_prefix(name: str) -> str:
    """`.NAME.`, the start of the hidden temporary file's name beside NAME,
    shortened (its start and a hash of it) where the temporary name would be
    longer than a file name may be: a legal NAME must still be writable."""
    prefix = f".{name}."
    # mkstemp adds 8 random characters, then the suffix.
    room = NAME_MAX - len(".keras") - 8
    if len(prefix.encode()) <= room:
        return prefix
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    start = name.encode()[: room - len(digest) - 3].decode(errors="ignore")
    return f".{start}~{digest}."


def _check_serializable(model: keras.Model) -> None:
    """Refuses, before writing, a model whose file could not be read back:
    Keras saves a rewritten model as a plain functional model, each layer by
    its `get_config`, and loads it with its class's `from_config`. Keras's
    own layers and this package's rebuild; some third-party ones (keras-hub
    decoders and encoders such as Llama3's, DeiT's, Qwen3's) do so only
    inside their own Backbone, whose `get_config` replaces theirs."""
    for path, layer in _own_and_nested_layers(model):
        if type(layer).__module__.split(".")[0] in ("keras", "stopgrad_lr"):
            continue
        try:
            type(layer).from_config(layer.get_config())
        except Exception as error:
            package = type(layer).__module__.split(".")[0]
            raise CommandError(
                f"cannot write the model: its layer '{path}' "
                f"({package}.{type(layer).__name__}) cannot be rebuilt from a "
                f"file ({type(error).__name__}: {_shortened(error)}). The "
                f"written file would be a plain keras.Model that saves this "
                f"layer by its own get_config and rebuilds it with its own "
                f"from_config, which this class does not support: a limitation "
                f"of {package}, whose model classes save such layers only "
                f"inside themselves. Rewrite the model in Python and keep it in "
                f"memory, or save only its weights."
            ) from None


def _own_and_nested_layers(model: keras.Model) -> Iterator[tuple[str, Any]]:
    """(path, layer) for each layer of the model and of its nested models."""
    import keras

    for layer in model.layers:
        yield layer.name, layer
        if isinstance(layer, keras.Model) and type(layer).__module__.startswith(
            "keras"
        ):
            for path, inner in _own_and_nested_layers(layer):
                yield f"{layer.name}/{path}", inner


def _move_without_replacing(source: str, target: str) -> None:
    """Renames `source` to `target` unless `target` exists, atomically:
    `os.link` fails with FileExistsError where `os.replace` would replace."""
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        # A file system without hard links: claim the name first, so that
        # nobody else's file is replaced, then move the file over the claim.
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.replace(source, target)
    else:
        os.remove(source)


def _umask() -> int:
    # The umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Keras, quietly ---------------------------------------------------------------


def _import_keras(verbose: bool) -> ModuleType:
    """Imports Keras (and so its backend), hiding the backend's start-up log
    unless `verbose`; a backend that is not installed is bad input, which
    says what to install or set."""
    if "keras" in sys.modules:
        import keras

        return keras
    try:
        return _import_keras_quietly(verbose)
    except (ModuleNotFoundError, ValueError) as error:
        message = _backend_error(error)
        if message is None:
            raise
        raise CommandError(message) from None


def _backend_error(error: Exception) -> str | None:
    """What to install or set when Keras's backend does not import; None
    for an error that is not that."""
    chosen = os.environ.get("KERAS_BACKEND")
    known = ", ".join(BACKEND_INSTALLS)
    if isinstance(error, ValueError):
        unknown = re.search(r"Unable to import backend\s*:\s*(\S+)", str(error))
        if unknown is None:
            return None
        return (
            f"Keras has no backend {unknown.group(1)!r} (KERAS_BACKEND="
            f"{chosen!r}, or the 'backend' of ~/.keras/keras.json): set "
            f"KERAS_BACKEND to one of {known}"
        )
    missing = (getattr(error, "name", None) or "").split(".")[0]
    if missing == "keras":
        return "Keras is not installed: pip install stopgrad-lr installs it"
    backend = chosen or (missing if missing in BACKEND_INSTALLS else "tensorflow")
    source = (
        f"KERAS_BACKEND={chosen}"
        if chosen
        else f"KERAS_BACKEND is unset, so Keras uses {backend} (its default, "
        f"unless ~/.keras/keras.json names another)"
    )
    install = BACKEND_INSTALLS.get(backend, f"pip install {missing}")
    what = (
        "which is not installed"
        if missing == backend
        else f"which failed to import: no module named {missing!r}"
    )
    return (
        f"Keras cannot start its backend: {source}, {what}. Install it "
        f"({install}), or set KERAS_BACKEND to a backend you have installed "
        f"(one of {known})"
    )


def _import_keras_quietly(verbose: bool) -> ModuleType:
    """Imports Keras, hiding the backend's start-up log unless `verbose`.

    TensorFlow's C++ runtime writes its start-up lines (oneDNN, CUDA, CPU
    features) straight to file descriptor 2, some of them even with
    TF_CPP_MIN_LOG_LEVEL=3 and some only when the first operation runs. So
    fd 2 points to a temporary file while Keras is imported and runs one
    operation, and back to the terminal after. If that fails, what was
    written there is real news and is passed on before the error.
    """
    if verbose:
        import keras

        return keras
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            import keras

            keras.ops.convert_to_numpy(keras.ops.zeros(()))
        except Exception:
            sys.stderr.flush()
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    return keras


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
            raise CommandError(in_command_terms(str(error))) from None
        finally:
            for warning in caught:
                text = in_command_terms(str(warning.message))
                print(f"{PROG}: warning: {_one_line(text)}", file=sys.stderr)


# The library's messages name its Python arguments; each is said here as the
# command's flag, or as the Python that the command has no flag for.
_COMMAND_TERMS = [
    # A ParameterScale that strip cannot fold.
    (
        r"apply_lr_multipliers\(\.\.\., mechanism='reparametrize'\)",
        f"`{PROG} rewrite --multiplier ... --mechanism reparametrize`",
    ),
    # Fixes that OptimizerMismatchWarning suggests.
    (
        r"`stopgrad_lr\.apply_lr_multipliers\(model, multipliers, optimizer=\.\.\.\)`"
        r" with mechanism='reparametrize'",
        "--optimizer NAME --mechanism reparametrize",
    ),
    (
        r"`stopgrad_lr\.apply_lr_multipliers\(model, multipliers, optimizer=\.\.\.\)`",
        "--optimizer NAME (with the default --mechanism auto)",
    ),
    (
        r"`stopgrad_lr\.gradient_cuts\(model\)` lists them",
        f"the Cut column of `{PROG} inspect` lists them",
    ),
    (r"on_bypass='(\w+)' or '(\w+)'", r"--on-bypass \1 or --on-bypass \2"),
    (r"on_bypass='(\w+)'", r"--on-bypass \1"),
    (r"mechanism='(\w+)' or '(\w+)'", r"--mechanism \1 or --mechanism \2"),
    (r"mechanism='(\w+)'", r"--mechanism \1"),
    (r"stop_at_zero=False", "--no-stop-at-zero"),
    (
        r"`stopgrad_lr\.apply_lr_multipliers\(stopgrad_lr\.strip_gradient_scales"
        r"\(model\), \.\.\.\)`",
        f"`{PROG} strip IN.keras PLAIN.keras`, then rewrite PLAIN.keras",
    ),
    (r"`stopgrad_lr\.strip_gradient_scales(?:\(model\))?`", f"`{PROG} strip`"),
    (
        r"`stopgrad_lr\.multi_optimizer\(model, multipliers, optimizer\)`",
        "`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)` in Python "
        "(an optimizer, which this command does not write)",
    ),
    # The end of an OptimizerMismatchWarning: how to repeat or silence it.
    (r"\s*stopgrad_lr\.check_optimizer\(optimizer, model\) repeats this.*$", ""),
]


def in_command_terms(message: str) -> str:
    """A library message with its Python arguments said as this command's
    flags."""
    for pattern, replacement in _COMMAND_TERMS:
        message = re.sub(pattern, replacement, message, flags=re.DOTALL)
    return message


def _count_own_layers(model: keras.Model) -> int:
    """How many layers of this package (registered under `stopgrad_lr>`)."""
    import keras

    def own(layer: Any) -> int:
        name = keras.saving.get_registered_name(type(layer))
        inner = (
            getattr(layer, "layers", None) if isinstance(layer, keras.Model) else None
        )
        return name.startswith("stopgrad_lr>") + sum(own(sub) for sub in inner or ())

    return sum(own(layer) for layer in model.layers)


def _print_error(message: Any) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


def _shortened(message: Any) -> str:
    """The first MESSAGE_LIMIT characters of a message, on one line."""
    text = _one_line(message)
    if len(text) <= MESSAGE_LIMIT:
        return text
    return text[: MESSAGE_LIMIT - 3].rstrip() + "..."


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())
