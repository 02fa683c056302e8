"""The ``capwrap`` command line: thin wrappers over the Python API.

Examples:
    $ capwrap demo --out demo_out --seed 0
    $ capwrap info ../shared/data/tinystories/stories260K --json
    $ capwrap diagnose BASE TUNED --capability "pcfg=count,operand=a" --downstream "pcfg=count,operand=b,correlation=1" --out diag
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from capwrap.errors import CapwrapError, CapwrapWarning, ConfigError
from capwrap.tasks.spec import spec_help

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from capwrap.demo import run_demo

    result = run_demo(
        args.out,
        seed=args.seed,
        scenario=args.scenario,
        backend=args.backend,
        pretrain=args.pretrain,
        finetune_steps=args.steps,
        eval_size=args.eval_size,
        diagnose_pair=not args.no_diagnose,
        progress=not args.quiet,
        log=print,
        device=args.device,
    )
    table = result.accuracy_table()
    print()
    print(table.to_string(float_format=lambda v: f"{v:6.1%}"))
    print()
    if result.diagnosis is not None:
        _print_findings(result.diagnosis)
        print(f"verdict: {result.summary['verdict']}")
    print(f"done in {result.summary['wall_seconds']:.0f} s; outputs in {result.out}/")
    return 0


def _print_findings(diagnosis) -> None:
    """The evidence table and both findings, as the terminal shows them."""
    columns = ["question", "analyzer", "kind", "value", "direction", "strength", "contribution"]
    print(diagnosis.summary()[columns].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print()
    for finding in diagnosis.findings:
        print(f"{finding.question}: {finding.verdict} — {finding.reasons[0]}")
    print()


def _info(args: argparse.Namespace) -> int:
    import json

    from capwrap.models import describe_model, load_model
    from capwrap.models.adapters import adapter_name

    info = describe_model(load_model(args.source, backend=args.backend, allow_pickle=args.allow_pickle))
    info["source"] = args.source
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    spec = info["spec"]
    print(f"{args.source}: {spec['architecture']} ({info['family']}), {info['parameters']:,} parameters, "
          f"backend {info['backend']}")  # fmt: skip
    print(f"  blocks: {info['blocks']}")
    print(f"  layers {spec['n_layers']}, d_model {spec['d_model']}, heads {spec['n_heads']} "
          f"(kv {spec['n_key_value_heads']}), d_head {spec['d_head']}, d_mlp {spec['d_mlp']}, "
          f"vocab {spec['d_vocab']}, context {spec['n_ctx']}")  # fmt: skip
    local = [i for i, kind in enumerate(spec["attention_layers"]) if kind == "local"]
    if local:
        print(f"  local attention (window {spec['window_size']}) in layers {', '.join(map(str, local))}")
    print("  components: " + ", ".join(f"{n:,} {k}" for k, n in info["components"].items()))
    if info["not_in_fast_engine"]:
        print(f"  patching: hooks engine only ({'; '.join(info['not_in_fast_engine'])})")
    else:
        print("  patching: fast engine (resumed) and hooks engine")
    print(f"  tokenizer: {info['tokenizer'] or 'none'}")
    if adapter := info.get("adapter"):
        kind = adapter_name(adapter["peft_type"], adapter.get("rank"), bool(adapter.get("dora")))
        print(f"  merged adapter: {kind} on {', '.join(adapter['target_modules'])} "
              f"({adapter['modules']} modules) from {adapter['path']}")  # fmt: skip
        for module, ids in adapter.get("trainable_tokens", {}).items():
            shown = ", ".join(map(str, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
            print(f"  trained token rows: {module}, ids {shown}")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from capwrap.diagnosis import diagnose_checkpoints
    from capwrap.diagnosis.checkpoints import EVIDENCE_FOLDER

    try:
        diagnosis = diagnose_checkpoints(
            args.base, args.tuned, args.capability, args.downstream, out=args.out, backend=args.backend,
            quick=args.quick, store=args.store, seed=args.seed, allow_pickle=args.allow_pickle, progress=not args.quiet,
            memory=args.memory, device=args.device, dtype=args.dtype, device_map=args.device_map,
            max_memory=parse_max_memory(args.max_memory), offload_folder=args.offload_folder, rule=args.rule,
        )  # fmt: skip
    except KeyboardInterrupt:
        kept = Path(args.out) / EVIDENCE_FOLDER if args.out else None
        if kept is not None and any(kept.glob("*.evidence")):
            print(f"capwrap: the finished analyzers' evidence is kept in {kept}; run the same command again to "
                  "resume", file=sys.stderr)  # fmt: skip
        raise
    if diagnosis.resumed:
        print(f"resumed: read back the evidence of {', '.join(diagnosis.resumed)} from {Path(args.out) / EVIDENCE_FOLDER} "
              "(an earlier run of this command)")  # fmt: skip
    acc = diagnosis.accuracy
    print(f"capability accuracy {acc['base']['capability']:.1%} (base) -> {acc['tuned']['capability']:.1%} (tuned); "
          f"downstream {acc['base']['downstream']:.1%} -> {acc['tuned']['downstream']:.1%}")  # fmt: skip
    _print_findings(diagnosis)
    print(f"verdict: {diagnosis.verdict}")
    if args.out:
        print(f"wrote {args.out}/summary.json and {args.out}/report.html")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from capwrap.diagnosis.rule import VerdictRule, default_rule
    from capwrap.validation import ValidationResult, fit_rule, run_suite, scenarios

    chosen = scenarios(args.split, args.scenario, args.kind)
    if args.list:
        for s in chosen:
            print(f"{s.name:48s} {s.split:11s} {s.kind:8s} {s.family:14s} {s.note}")
        print(f"{len(chosen)} scenarios")
        return 0
    if not chosen:
        raise ConfigError("no scenario matches; list them with capwrap validate --list --split all")
    if args.fit:  # decided before the suite runs, not after
        held_out = [s.name for s in chosen if s.split != "calibration"]
        if held_out:
            raise ConfigError(
                f"--fit fits the verdict rule on calibration scenarios only, and {len(held_out)} of these are held out "
                f"({held_out[0]} ...); run --split calibration with --fit"
            )
        if Path(args.fit).is_dir():
            raise ConfigError(f"--fit {args.fit} is a folder; name the rule file to write (e.g. rule.json)")
    import time

    rule = VerdictRule.load(args.rule) if args.rule else default_rule()

    log = (lambda message: None) if args.quiet else print
    started = time.perf_counter()
    try:
        records = run_suite(chosen, args.out, workers=args.workers, ray_address=args.ray, cache=args.cache, rule=rule,
                            n_boot=args.n_boot, progress=not args.quiet, log=log, memory=args.memory,
                            threads=args.threads or 1)  # fmt: skip
    except KeyboardInterrupt:
        from capwrap.validation.runner import record_path

        kept = sum(record_path(args.out, s).exists() for s in chosen)
        if kept:
            print(f"capwrap: the records of {kept} finished scenario{'s' if kept != 1 else ''} are kept in "
                  f"{Path(args.out) / 'scenarios'}; run the same command again to go on", file=sys.stderr)  # fmt: skip
        raise
    wall = time.perf_counter() - started
    if args.fit:
        command = "capwrap validate " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "capwrap validate"
        rule = fit_rule(records, start=rule, command=command)
        rule.save(args.fit)
        print(f"fitted the verdict rule on {len(records)} scenarios; wrote {args.fit}")
    plural = "" if args.workers == 1 else "s"
    where = f"Ray at {args.ray}" if args.ray else f"{args.workers} local worker{plural}"
    result = ValidationResult.from_records(records, rule, split=args.split, wall_seconds=round(wall, 1),
                                           workers=where, command="capwrap " + " ".join(sys.argv[1:]))  # fmt: skip
    print(result.summary_text())
    print(f"{len(records)} scenarios in {wall / 60:.1f} min with {where} (their records hold "
          f"{result.meta['scenario_seconds'] / 60:.1f} min of building and diagnosing, summed over workers)")
    _keep_other_split(Path(args.out), args.split)
    json_path, html_path = result.write(args.out)
    for name in (f"validation.{args.split}.json", f"validation.{args.split}.html"):  # an older result of this
        (Path(args.out) / name).unlink(missing_ok=True)  # split, kept when the other was run: superseded now
    print(f"wrote {json_path} and {html_path}")
    return 0


def _keep_other_split(out: Path, split: str) -> None:
    """One results folder may hold both halves' records: the result of the other split that
    ``out/validation.json`` holds is kept as ``validation.SPLIT.json`` (and ``.html``) before this
    split's replaces it."""
    held = _read_json_key(out / "validation.json", "split")
    if held in (None, split):
        return
    for name in ("validation.json", "validation.html"):
        if (out / name).is_file():
            (out / name).replace(out / name.replace(".", f".{held}.", 1))
    print(f"kept the {held} split's result as validation.{held}.json and .html in {out}")


def _read_json_key(path: Path, key: str) -> Any:
    """``key`` of the JSON object in ``path``; None when the file cannot be read as one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


class _OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of an option is one line (the reason and where the options
    are listed) instead of the usage block and the reason; its subcommands' parsers are the same."""

    #: The subcommands' parsers by name (set on the top-level parser by :func:`build_parser`).
    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (the options: {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """As argparse's, but an option no parser knows is refused by the subcommand it follows
        (argparse's top-level parser names itself and points to its own help, which lists no option
        of the subcommand)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.commands.get(getattr(parsed, "command", None), self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="capwrap",
        description="Did fine-tuning change a capability, or only wrap it? Analyses on TransformerLens models.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune a small PCFG counting model with recording, and report")
    demo.add_argument("--out", default="capwrap_demo", help="output folder (default: capwrap_demo)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of fine-tuning data and test sets (default 0)")
    demo.add_argument(
        "--scenario",
        default="default",
        choices=["default", "removed"],
        help="default: the study; removed: the negative control (every block re-initialized, then fine-tuned at C_Tr = 0)",
    )
    _add_backend_option(demo)
    _add_device_option(demo)
    demo.add_argument("--pretrain", action="store_true", help="pretrain the base model here (about 15 min)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps (default 300)")
    demo.add_argument("--eval-size", type=_positive_int, default=2048, help="sequences per test set (default 2048)")
    demo.add_argument("--no-diagnose", action="store_true", help="skip diagnose() (no verdict)")
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="architecture and component counts of a checkpoint (folder or hub name)")
    info.add_argument("source", help="a checkpoint folder, a Hugging Face hub name, or a PEFT LoRA adapter folder")
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_backend_option(info)
    info.add_argument("--allow-pickle", action="store_true", help="also read pytorch_model.bin (weights_only)")
    info.set_defaults(func=_info)

    diag = sub.add_parser(
        "diagnose",
        help="did fine-tuning change a capability, or wrap it? (any compatible pair)",
        epilog=spec_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    diag.add_argument("base", help="the base checkpoint (folder or hub name)")
    diag.add_argument(
        "tuned", help="the fine-tuned checkpoint (folder or hub name), or a PEFT LoRA adapter folder of BASE"
    )
    diag.add_argument(
        "--capability",
        required=True,
        help="task spec of the capability, e.g. pcfg=count,operand=a or text=stories.txt,feature=word:Lily",
    )
    diag.add_argument("--downstream", required=True,
                      help="task spec of the fine-tuning task, e.g. pcfg=count,operand=b,correlation=1 or text=stories.txt,without=word:Lily")  # fmt: skip
    diag.add_argument("--out", default=None,
                      help="folder for summary.json and report.html; it also keeps each finished analyzer's evidence "
                           "(OUT/evidence), so that the same command run again after an interruption resumes")  # fmt: skip
    diag.add_argument("--store", default=None, help="the fine-tuning run's RunStore folder, if recorded")
    diag.add_argument("--quick", action="store_true", help="smaller samples and budgets (minutes instead of more)")
    diag.add_argument("--rule", default=None, metavar="RULE.json",
                      help="a verdict rule file to weigh the evidence with (default: the fitted rule)")  # fmt: skip
    diag.add_argument("--seed", type=_seed, default=0, help="seed of the evaluation set and the analyzers (default 0)")
    diag.add_argument("--memory", choices=["normal", "low"], default="normal",
                      help="low: the two models take turns in memory (about one model's worth; the other waits in a "
                           "temporary file), for the same numbers except revival's, which trains with Adafactor "
                           "instead of AdamW (its step counts differ)")  # fmt: skip
    _add_backend_option(diag)
    _add_device_option(diag)
    diag.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="precision the two models are loaded in (default float32; bfloat16 halves their memory, "
                           "the analyzers still probe and sum in float32)")  # fmt: skip
    diag.add_argument("--allow-pickle", action="store_true", help="also read pytorch_model.bin (weights_only)")
    diag.add_argument("--device-map", default=None, metavar="MAP",
                      help="spread each model over the GPUs, the CPU and disk with accelerate (auto, balanced, "
                           "sequential); the models then take turns as with --memory low")  # fmt: skip
    diag.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                      help="with --device-map, what each device may hold, e.g. 0=20GiB,cpu=60GiB (the CPU needs room "
                           "for one model's offloaded part when the analyzers read its weights)")  # fmt: skip
    diag.add_argument("--offload-folder", default=None, metavar="DIR",
                      help="with --device-map, where what does not fit goes (default: a temporary folder)")  # fmt: skip
    diag.set_defaults(func=_diagnose)

    val = sub.add_parser(
        "validate", help="run the suite of fine-tuning scenarios with known truth; measure the verdict"
    )
    val.add_argument("--split", default="held-out", choices=["calibration", "held-out", "all"],
                     help="which half of the suite (default held-out)")  # fmt: skip
    val.add_argument("--scenario", action="append", default=None, metavar="NAME",
                     help="only this scenario (a name or a glob pattern; repeatable)")  # fmt: skip
    val.add_argument("--kind", action="append", default=None, choices=["wrapper", "removed", "genuine", "kept", "unknown"],
                     help="only scenarios of this kind (repeatable)")  # fmt: skip
    val.add_argument("--out", default="capwrap_validation", help="results folder (default capwrap_validation)")
    val.add_argument("--workers", type=_positive_int, default=2, help="local worker processes (default 2)")
    val.add_argument("--ray", default=None, metavar="ADDRESS", help="run on a Ray cluster ('local' starts one here)")
    val.add_argument("--cache", default=None, help="where tuned models are kept between runs (default OUT/cache)")
    val.add_argument("--rule", default=None, help="a verdict rule file to score with (default: the fitted rule)")
    val.add_argument(
        "--fit", default=None, metavar="RULE.json", help="fit the verdict rule on these scenarios and save it"
    )
    val.add_argument("--n-boot", type=_positive_int, default=200,
                     help="bootstrap replicates (default 200; at least 20 for the rule's 90%% intervals)")
    val.add_argument("--memory", choices=["normal", "low"], default="normal",
                     help="diagnose as --memory low does (models taking turns, revival in about one model's memory)")  # fmt: skip
    val.add_argument("--list", action="store_true", help="list the scenarios and exit")
    val.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                     help="torch CPU threads of each scenario (default 1, whatever --workers or Ray: the records "
                          "depend on it)")  # fmt: skip
    val.set_defaults(func=_validate)

    for command in sub.choices.values():  # every command, including ones added above later
        _add_common_options(command)
    parser.commands = dict(sub.choices)
    return parser


# ---- options and behaviour every command shares ----------------------------------------------------
def _version() -> str:
    from importlib.metadata import version

    from capwrap import __version__

    return f"capwrap {__version__} (TransformerLens {version('transformer-lens')}, torch {version('torch')})"


def _add_backend_option(parser: argparse.ArgumentParser) -> None:
    from capwrap.models import available_backends, default_backend

    backends = available_backends()
    parser.add_argument(
        "--backend", choices=backends, default=None,
        help=f"TransformerLens backend: {' or '.join(backends)} with the installed TransformerLens (default {default_backend()}; the bridge for checkpoints only it runs)",
    )  # fmt: skip


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``--max-memory``'s ``DEVICE=SIZE,...`` as accelerate's ``max_memory`` (GPU indices as integers).

    Examples:
        >>> parse_max_memory("0=20GiB, cuda:1=20GiB, cpu=60GiB")
        {0: '20GiB', 1: '20GiB', 'cpu': '60GiB'}
        >>> parse_max_memory("cpu")
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: --max-memory takes DEVICE=SIZE pairs separated by commas (e.g. 0=20GiB,cpu=60GiB), got 'cpu'
    """
    if text is None:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        device, sep, size = (x.strip() for x in part.partition("="))
        if not (sep and device and size):
            raise ConfigError(
                f"--max-memory takes DEVICE=SIZE pairs separated by commas (e.g. 0=20GiB,cpu=60GiB), got {text!r}"
            )
        index = device.removeprefix("cuda:")  # accelerate names a GPU by its index alone
        out[int(index) if index.isdigit() else device] = size
    return out


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="where the models run: cpu (default), cuda, cuda:1 ...")  # fmt: skip


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    options = {a for action in parser._actions for a in action.option_strings}
    if "--quiet" not in options:
        parser.add_argument(
            "--quiet", action="store_true", help="no progress bars (capwrap's, datasets', transformers')"
        )
    if "--debug" not in options:
        parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    if "--threads" not in options:
        parser.add_argument(
            "--threads", type=_positive_int, default=None, metavar="N",
            help="torch CPU threads (default: the cores other processes leave idle, sampled when the "
                 "command starts, at least 1; OMP_NUM_THREADS, if set, instead)",
        )  # fmt: skip


def _seed(text: str) -> int:
    """A seed: a whole number from 0 to 2**31 - 1 (seeds derived from it by offsets stay in every
    generator's range)."""
    from capwrap.analyzers.base import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {MAX_SEED}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def default_threads() -> int:
    """Torch CPU threads for a command: ``OMP_NUM_THREADS`` when the user set it; otherwise the
    cores other processes leave idle, at least 1. On a shared machine a second thread that must wait
    for a busy core slows every step down (``benchmarks/threads.py`` measures it); on an idle one it
    speeds them up. The busy cores are sampled over a fifth of a second while this process waits, so
    a Python session that was itself computing does not count as load (the 1-minute load average,
    the fallback where ``/proc/stat`` is missing, would)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores(0.2)
    return max(1, min(cores, round(cores - busy)))


def busy_cores(interval: float) -> float:
    """How many cores other processes keep busy, sampled over ``interval`` seconds (``/proc/stat``);
    the 1-minute load average where the kernel does not offer it."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    before = sample()
    if before is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(interval)
    after = sample()
    if after is None or after[1] <= before[1]:
        return 0.0
    share = (after[0] - before[0]) / (after[1] - before[1])  # of every core the kernel counts
    return share * (os.cpu_count() or 1)


#: Failures a user's input or environment causes (a missing file, a full disk, a value a library
#: rejects): one line and exit code 2, never a traceback (``--debug`` shows it).
EXPECTED_ERRORS = (CapwrapError, OSError, ValueError, MemoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 on an error, 130 when interrupted by Ctrl-C,
    143 when terminated by SIGTERM)."""
    from capwrap.provenance import invoked_as

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        with (
            _terminate_as_interrupt(),
            _progress_bars(enabled=not args.quiet),
            _plain_warnings(),
            _torch_threads(args.threads or default_threads()),
            invoked_as(shlex.join(["capwrap", *argv])),
        ):
            return args.func(args)
    except KeyboardInterrupt as exc:
        if not isinstance(exc, Terminated):
            if args.debug:
                raise  # Python shows the traceback and exits as Ctrl-C ended it (130)
            print("capwrap: interrupted", file=sys.stderr)
            return 130
        if args.debug:  # an uncaught subclass would exit 1, a failure to a scheduler
            traceback.print_exc()
        print("capwrap: terminated (SIGTERM)", file=sys.stderr)
        return 143  # as the shell reports a process SIGTERM ended: 128 + 15
    except BrokenPipeError:  # the reader of the output stopped early (capwrap validate --list | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # as a process killed by SIGPIPE: quiet, but not a success
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        print(f"capwrap: error: {describe_error(exc)}", file=sys.stderr)
        return 2


def describe_error(exc: BaseException) -> str:
    """``exc`` as one line: capwrap's own messages as they are; others with their type, and a
    pointer to ``--debug``.

    Examples:
        >>> describe_error(FileExistsError(17, "File exists", "out/report.html"))
        'File exists: out/report.html (FileExistsError; run with --debug for the traceback)'
    """
    if isinstance(exc, CapwrapError):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc) or "no message"
    return f"{' '.join(text.split())} ({type(exc).__name__}; run with --debug for the traceback)"


@contextlib.contextmanager
def _plain_warnings():
    """capwrap's own warnings (:class:`~capwrap.errors.CapwrapWarning`) as one line each,
    ``capwrap: warning: ...``, without the source line Python shows; others as Python shows them."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CapwrapWarning):
            print(f"capwrap: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so it stops as Ctrl-C stops it; the exit code (143) still
    tells a scheduler that the job was terminated, not interrupted at a terminal."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``kill``, a scheduler preempting the job) stops a command as Ctrl-C does: finished work
    is kept, worker processes are stopped, and it says so (exit code 143), rather than dying mid-write."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) in (
        signal.SIG_IGN, None  # ignored on purpose, or handled outside Python: left as it is
    ):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Terminated

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch uses ``n`` CPU threads while a command runs (restored after, for callers in Python)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """Silence the progress bars of the libraries capwrap calls (datasets' "Filter:" and "Map:",
    Hugging Face downloads) while a command runs, when ``enabled`` is false. capwrap's own bars
    follow each command's ``progress=`` argument."""
    if enabled:
        yield
        return
    saved = {k: os.environ.get(k) for k in _PROGRESS_ENV}
    os.environ.update(dict.fromkeys(_PROGRESS_ENV, "1"))  # for the libraries not imported yet
    restore = [switch() for name, switch in _PROGRESS_SWITCHES.items() if name in sys.modules]
    try:
        yield
    finally:
        for undo in restore:
            undo()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_PROGRESS_ENV = ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")


def _quiet_datasets():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    return datasets.enable_progress_bars if was else lambda: None


def _quiet_transformers():
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    return logging.enable_progress_bar if was else lambda: None


def _quiet_hub():
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = not are_progress_bars_disabled()
    disable_progress_bars()
    return enable_progress_bars if was else lambda: None


#: Module -> a function that turns its progress bars off and returns how to turn them back on.
_PROGRESS_SWITCHES = {"datasets": _quiet_datasets, "transformers": _quiet_transformers, "huggingface_hub": _quiet_hub}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
