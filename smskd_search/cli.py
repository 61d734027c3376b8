"""Command line: parses, calls the library, prints. The only module that knows about the terminal.

    smskd-search [--space FILE] [--budget N] ...        search (the default command)
    smskd-search teacher --space FILE                    train / check and cache the space's teacher
    smskd-search train PLAN.yaml | --method M --epochs N --space S
    smskd-search methods                                 the KD methods with their parameters
    smskd-search studies                                 the studies with trial counts and best value
    smskd-search dashboard [STUDY] [--port P]            optuna-dashboard on a study
    smskd-search export STUDY [--top K | --trial N]      best completed plans as YAML
    smskd-search verify PLAN.yaml [--seeds 3]            plan vs single methods on test, several seeds
    smskd-search report STUDY [--out FILE]               one self-contained HTML page
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from smskd_search.errors import UserError

if TYPE_CHECKING:
    from smskd_search.search_settings import SearchSettings

STUDIES_DIR = Path(os.environ.get("SMSKD_STUDIES", "studies"))
CUDA_GRAPHS_HELP = ("on a GPU, record the training step (each stage's, and the teacher's where it is trained) as a "
                    "CUDA graph and replay it (one launch a step "
                    "instead of hundreds); stages it cannot take run eagerly, said in a note; no effect on a CPU. "
                    "Not yet measured on a GPU: off by default")


class Line:
    """One status line that rewrites itself on a terminal and prints plainly elsewhere."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.tty = stream.isatty()
        self.width = 0
        self.last_key: object = None

    def update(self, text: str, key: object = None) -> None:
        """Show ``text``. Off a terminal, a line whose ``key`` equals the previous one is skipped
        (a log gets one line per change of state, not one per tick)."""
        if not self.tty and key is not None:
            if key == self.last_key:
                return
            self.last_key = key
        if self.tty:
            pad = " " * max(0, self.width - len(text))
            self.stream.write("\r" + text + pad)
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self, text: str | None = None) -> None:
        if text is not None:
            self.update(text)
        if self.tty:
            self.stream.write("\n")
            self.width = 0
        self.stream.flush()


def _pct(acc: float) -> str:
    return f"{100 * acc:.2f}%"


def _eta(elapsed: float, done: int, total: int) -> str:
    """``12s, about 1m 40s left`` after ``done`` of ``total`` equal steps."""
    from smskd_search.summary_text import fmt_duration

    left = elapsed / max(done, 1) * (total - done)
    return f"{fmt_duration(elapsed)}" + (f", about {fmt_duration(left)} left" if done < total else "")


# --------------------------------------------------------------------------------------- teacher
def cmd_teacher(args: argparse.Namespace) -> int:
    from smskd_search.engine import ensure_teacher, pick_device
    from smskd_search.engine.teacher import describe, published_note, teacher_dir
    from smskd_search.space import load_space

    loaded = load_space(args.space)
    problem = loaded.space.problem
    cache = Path(args.cache) if args.cache else STUDIES_DIR / "teachers"
    hit = (teacher_dir(problem, cache) / "teacher.json").is_file()
    line = Line()
    start = time.time()
    trained: list[float] = []  # seconds to the end of each epoch, from the training's start

    def on_start(job) -> None:
        nonlocal start
        print(job.describe(), flush=True)
        start = time.time()  # the estimate is of training alone, without loading the data

    def on_epoch(epoch: int, epochs: int, loss: float, val_acc: float) -> None:
        trained.append(time.time() - start)
        bar = "#" * int(20 * epoch / epochs)
        line.update(f"teacher {problem.teacher.arch} [{bar:<20}] epoch {epoch}/{epochs}  loss {loss:.4f}  "
                    f"val acc {_pct(val_acc)}  {_eta(trained[-1], epoch, epochs)}")

    record = ensure_teacher(problem, cache_root=cache, device=pick_device(args.device), with_test=True,
                            on_epoch=on_epoch, on_start=on_start, cuda_graphs=args.cuda_graphs)
    if line.width or not hit:
        line.done()
    if trained:
        # The first epoch also pays for cuDNN's and (with --cuda-graphs) the recording's warm-up.
        later = f", {(trained[-1] - trained[0]) / (len(trained) - 1):.2f}s an epoch after the first" \
            if len(trained) > 1 else ""
        print(f"trained in {trained[-1]:.1f}s{later} (validation included)")
    print(("cache hit: " if hit else "") + describe(record))
    note = published_note(problem, record)
    if note is not None:
        print(note)
    return 0


# ----------------------------------------------------------------------------------------- train
def _baseline_plan(args: argparse.Namespace):
    from smskd_search.space import load_space, make_plan

    if args.epochs is None or args.epochs < 1:
        raise UserError("--epochs: a single-method baseline needs --epochs N (N >= 1)")
    loaded = load_space(args.space)
    from smskd_search.methods import METHODS

    if args.method not in METHODS:
        raise UserError(f"--method: unknown method {args.method!r}; known: {', '.join(sorted(METHODS))}")
    return make_plan(loaded.space, [(args.method, args.epochs)], name=f"{args.method}{args.epochs}-{loaded.space.name}")


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from smskd_search.engine import (
        EpochTrained,
        RunOptions,
        StageEvent,
        StageReused,
        StageTrained,
        Workbench,
        evaluate_test,
        pick_device,
        run_plan,
        write_results,
    )
    from smskd_search.engine.teacher import describe
    from smskd_search.validate import load_plan_and_defaults

    if args.plan is not None and args.method is not None:
        raise UserError("train: give either PLAN.yaml or --method/--epochs/--space, not both")
    if args.plan is None and args.method is None:
        raise UserError("train: give PLAN.yaml, or --method M --epochs N [--space S] for a single-method baseline")
    defaulted: list[str] = []
    if args.plan is not None:
        plan, defaulted = load_plan_and_defaults(args.plan)
    else:
        plan = _baseline_plan(args)
    if args.seed is not None:
        plan = plan.model_copy(update={"seed": args.seed})
    threads = args.threads or (plan.provenance or {}).get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(args.out) if args.out else STUDIES_DIR / "runs" / f"{plan.name}-{plan.content_hash()}"
    device = pick_device(args.device)
    ref = plan.reference
    reference = ("no reference (one stage)" if len(plan.stages) == 1
                 else "no reference (weight mode none)" if ref.weight_mode == "none"
                 else f"reference lambda_ref {ref.lambda_ref:g}, weights {ref.weight_mode}"
                      + (" divided by their batch mean" if ref.normalize == "batch_mean" else ""))
    print(f"plan {plan.name}: {plan.sequence()}  ({plan.total_epochs} epochs, seed {plan.seed}, {reference}, "
          f"device {device}, threads {torch.get_num_threads()})")
    if defaulted:
        print(f"defaults used for what {args.plan} leaves out: {', '.join(defaulted)} (see `Plan` in smskd_search/plan.py)")
    line = Line()
    n_stages = len(plan.stages)

    def on_event(event: StageEvent) -> bool:
        if isinstance(event, EpochTrained):
            st, m = plan.stages[event.stage], event.metrics
            line.update(f"  stage {event.stage + 1}/{n_stages} {st.method:<8} epoch {m.epoch}/{st.epochs}  "
                        f"loss {m.train_loss:.4f}  train acc {_pct(m.train_acc)}  val acc {_pct(m.val_acc)}  lr {m.lr:.4g}")
        elif isinstance(event, (StageTrained, StageReused)):
            line.done()
            r = event.result
            ref = "  (with reference)" if r.reference_active else ""
            print(f"stage {event.stage + 1}/{n_stages} {r.method}({r.epochs}) done at {r.cum_epochs} epochs: "
                  f"val acc {_pct(r.val_acc)} (n={r.n_val}){ref}")
        return False

    bench = Workbench.open(plan.problem, device=device, precision=args.precision,
                           teacher_cache=STUDIES_DIR / "teachers", deterministic=args.deterministic)
    result = run_plan(plan, bench, RunOptions(out_dir=out, resume=args.resume, cuda_graphs=args.cuda_graphs), on_event)
    if result.resumed_from_stage is not None:
        print(f"resumed after stage {result.resumed_from_stage + 1} from {out}")
    for note in result.notes:
        print(f"note: {note}")
    test = evaluate_test(plan, result, precision=args.precision)
    write_results(out / "results.json", plan, result, test)
    print(describe(result.teacher))
    print(f"final: val acc {_pct(result.final_val_acc)} (n={result.stages[-1].n_val}), "
          f"test acc {_pct(test.acc)} (n={test.n}, s.e. {100 * test.stderr:.2f} points)")
    print(f"results: {out / 'results.json'}")
    return 0


# --------------------------------------------------------------------------------------- methods
def cmd_methods(args: argparse.Namespace) -> int:
    from smskd_search.methods.catalog import method_rows, pair_default_rows

    for row in method_rows():
        print(f"{row['name']:<9} {row['family']:<9} {row['reference']}")
        for p in row["params"]:
            note = " (default per pair, below)" if p["per_pair"] else ""
            print(f"    {p['name']:<17} = {p['default']!r:<10} {p['description']}{note}")
    print()
    print("pair defaults (teacher -> student): a plan built from a space states them unless the space sets the parameter")
    for r in pair_default_rows():
        values = ", ".join(f"{r['method']}.{k} = {v!r}" for k, v in r["params"].items())
        print(f"    {r['teacher'] + ' -> ' + r['student']:<30} {values}")
    return 0


# ---------------------------------------------------------------------------------------- search
def settings_from_flags(args: argparse.Namespace) -> SearchSettings:
    """The search's settings from its flags: checked once, here (a UserError naming the flag)."""
    from smskd_search.search_settings import ConfirmSettings, SearchSettings

    if not math.isfinite(args.cache_max_gb):
        raise UserError(f"--cache-max-gb must be a finite number > 0 (got {args.cache_max_gb:g})")
    return SearchSettings(
        budget=args.budget, study=args.study, studies_dir=STUDIES_DIR, max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, address=args.address, seed=args.seed,
        timeout=args.timeout, resume=args.resume, prune=not args.no_prune, baselines=not args.no_baselines,
        confirm=None if args.no_confirm else ConfirmSettings(plans=args.confirm, seeds=args.confirm_seeds),
        deterministic=args.deterministic, cache=not args.no_cache, cache_max_bytes=int(args.cache_max_gb * 2**30),
        storage=args.storage, cuda_graphs=args.cuda_graphs, mps=args.mps)


def cmd_search(args: argparse.Namespace) -> int:
    # Before the imports below (torch, Ray, scikit-learn: seconds): a wrong flag is said at once.
    settings = settings_from_flags(args)
    from smskd_search.search import ProgressInfo, run_search
    from smskd_search.space import load_space
    from smskd_search.summary_text import format_leaderboard, progress_line

    loaded = load_space(args.space)
    line = Line()

    def on_progress(p: ProgressInfo) -> None:
        line.update(progress_line(p), key=(p.done, p.pruned, p.failed, p.best_value))

    teacher_start = [time.time()]

    def on_teacher_start(job) -> None:
        print(job.describe(), flush=True)
        teacher_start[0] = time.time()

    def on_teacher_epoch(epoch: int, epochs: int, loss: float, val_acc: float) -> None:
        line.update(f"training the teacher {loaded.space.problem.teacher.arch} (once, cached): epoch {epoch}/{epochs}"
                    f"  loss {loss:.4f}  val acc {_pct(val_acc)}  {_eta(time.time() - teacher_start[0], epoch, epochs)}")
        if epoch == epochs:
            line.done()

    def on_teacher_ready(record) -> None:
        from smskd_search.engine.teacher import describe, published_note

        # torchvision's weights are measured on this split, not trained here: say how they do on it.
        if loaded.space.problem.teacher.weights:
            line.done()
            note = published_note(loaded.space.problem, record)
            print(describe(record) + ("\n" + note if note else ""), flush=True)

    summary = run_search(loaded, settings, on_progress=on_progress, on_teacher_epoch=on_teacher_epoch,
                         on_teacher_start=on_teacher_start, on_teacher_ready=on_teacher_ready)
    line.done()
    print(format_leaderboard(summary))
    if summary.all_failed is not None:
        print(f"error: all {summary.done} trial(s) of study {summary.study} failed; the first, {summary.all_failed}",
              file=sys.stderr)
        return 1
    if summary.stop_reason == "infrastructure":
        print(f"error: study {summary.study} stopped at {summary.done}/{summary.budget} trials: {summary.n_infrastructure} "
              "trial(s) failed through the infrastructure, after their retries (see their fail_reason)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------- inspect: dashboard, export, verify, report
def cmd_dashboard(args: argparse.Namespace) -> int:
    from smskd_search.dashboard import run_until_stopped, start_dashboard

    dash = start_dashboard(STUDIES_DIR, args.study, host=args.host, port=args.port)
    print(f"optuna-dashboard on study {dash.db.stem} ({dash.db}): {dash.url}  (Ctrl-C stops it)", flush=True)
    return run_until_stopped(dash)


def cmd_export(args: argparse.Namespace) -> int:
    from smskd_search.export import export_plans

    for e in export_plans(STUDIES_DIR, args.study, top=args.top, out=args.out, trial=args.trial):
        n = f" (n={e.n_val})" if e.n_val else ""
        tag = f"  [baseline {e.baseline}]" if e.baseline else ""
        where = f"rank {e.rank}" if e.rank is not None else "chosen"
        print(f"{where}: trial #{e.trial}  val acc {_pct(e.val_acc)}{n}  {e.sequence}{tag}  -> {e.path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    import torch

    from smskd_search.space import load_space
    from smskd_search.validate import load_plan
    from smskd_search.verify import SEED_OFFSET, format_table, run_verify, to_dict

    plan = load_plan(args.plan)
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1 (got {args.seeds})")
    space_ref = args.space or (plan.provenance or {}).get("space_path")
    methods, params, against = None, None, "the plan's own methods"
    if space_ref:
        space = load_space(space_ref).space
        if space.search is not None:
            methods, params = list(space.search.methods), dict(space.search.method_params)
            against = f"every method of space {space.name!r}"
    threads = args.threads or (plan.provenance or {}).get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    line = Line()

    def on_run(label: str, seed: int, i: int, total: int) -> None:
        line.update(f"  {i}/{total} runs done (last: {label} seed {seed})")

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {args.jobs})")
    if not args.no_cache and not args.cache_max_gb > 0:
        raise UserError(f"--cache-max-gb must be > 0 (got {args.cache_max_gb:g})")
    line.update("  starting the runs")
    rows, verdict = run_verify(plan, seeds=args.seeds, device=args.device, teacher_cache=STUDIES_DIR / "teachers",
                               methods=methods, method_params=params, on_run=on_run, jobs=args.jobs,
                               stage_cache=None if args.no_cache else STUDIES_DIR / "cache" / "stages",
                               cache_max_bytes=int(args.cache_max_gb * 2**30), cuda_graphs=args.cuda_graphs)
    line.done()
    print(f"plan {plan.name}: {plan.sequence()}  ({plan.total_epochs} epochs) against {against} at equal epochs, "
          f"the same {args.seeds} seed(s) from {plan.seed + SEED_OFFSET}, "
          f"threads {torch.get_num_threads()}; test accuracy:")
    print(format_table(rows, verdict))
    trained, reused = sum(r.epochs_trained for r in rows), sum(r.epochs_reused for r in rows)
    print(f"epochs: {trained} trained" + (" (stage cache off)" if args.no_cache
                                         else f", {reused} reused from the stage cache ({STUDIES_DIR / 'cache' / 'stages'})"))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(to_dict(rows, verdict), indent=2))
        print(f"results: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from smskd_search.report import write_report

    path = write_report(STUDIES_DIR, args.study, out=args.out)
    print(f"report: {path} (open it in a browser; it loads nothing from the network)")
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from smskd_search.export import trial_n_val
    from smskd_search.search.storage import list_studies

    infos = list_studies(STUDIES_DIR)
    if not infos:
        print(f"no studies in {STUDIES_DIR}")
        return 0
    for s in infos:
        if s.error:
            print(f"{s.name:<24} unreadable: {s.error}")
            continue
        c = s.counts
        budget = f"/{s.budget}" if s.budget else ""
        best = "best -"
        if s.best_value is not None and s.best_trial is not None:
            n = trial_n_val(s.db_path, s.best_trial)
            over = f" over {s.best_confirmed_seeds} fresh seeds" if s.best_confirmed_seeds else (f" (n={n})" if n else "")
            best = f"best {_pct(s.best_value)}{over} #{s.best_trial} {s.best_sequence or ''}"
        extra = ([f"+{s.n_repeats} repeats"] if s.n_repeats else []) + \
            ([f"+{s.n_confirmation_runs} confirmation runs"] if s.n_confirmation_runs else [])
        confirm = f" ({', '.join(extra)})" if extra else ""
        print(f"{s.name:<24} {s.n_trials}{budget} trials{confirm}: {c.get('COMPLETE', 0)} complete, "
              f"{c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed, {c.get('RUNNING', 0)} running  {best}")
    return 0


# ------------------------------------------------------------------------------------------ main
def _search_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Search SMSKD stage sequences (Ray Tune + Optuna).",
                                epilog="other commands: teacher, train, methods, studies, dashboard, export, verify, report "
                                       "(smskd-search COMMAND --help)")
    p.add_argument("--space", default=None, help="space file or built-in name (default: spaces/default.yaml)")
    p.add_argument("--budget", type=int, default=50, help="number of trials (default 50)")
    p.add_argument("--study", default=None, help="study name (default: derived from the space)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: from CPUs/GPUs)")
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="may be fractional (default: the space's)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster ('auto' or host:port)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study to its budget")
    p.add_argument("--no-prune", action="store_true", help="switch stage-level pruning off")
    p.add_argument("--no-baselines", action="store_true", help="do not enqueue the single-method baselines")
    p.add_argument("--confirm", type=int, default=3, metavar="K",
                   help="after the budget, re-run the K best distinct plans and the 2 best baselines on fresh seeds "
                        "(default 3)")
    p.add_argument("--confirm-seeds", type=int, default=3, metavar="S", help="fresh seeds per confirmed plan (default 3)")
    p.add_argument("--no-confirm", action="store_true", help="no confirmation runs: rank by single-seed values")
    p.add_argument("--no-cache", action="store_true",
                   help="train every stage: no stage-prefix cache and no teacher-logit store (default: finished "
                        "stages are kept in studies/cache/stages and a trial starts from the longest prefix of its "
                        "stages there; with augmentation, the teacher's logits of each epoch are kept in "
                        "studies/cache/teacher_logits and KD, DKD and CE epochs read them)")
    p.add_argument("--cache-max-gb", type=float, default=2.0, metavar="GB",
                   help="size cap of each cache folder (stage cache: least recently used entries go first; "
                        "teacher logits: a full folder takes no more) (default 2)")
    p.add_argument("--storage", default=None, metavar="FOLDER|URI",
                   help="where trials write (stage checkpoints, Tune's files, the stage cache): on a cluster of several "
                        "nodes, a folder every node mounts at the same path, or an s3:// URI (pyarrow's form, e.g. "
                        "s3://bucket/prefix?endpoint_override=host:9000&scheme=http; credentials from the AWS_* "
                        "variables) (default: studies/)")
    p.add_argument("--deterministic", action="store_true",
                   help="the same space and --seed give the same study (one trial at a time); on a GPU this also turns "
                        "on PyTorch's deterministic algorithms (slower). Without it, a CPU study is still "
                        "bit-for-bit per trial, a GPU one close, not bit-for-bit")
    p.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    p.add_argument("--mps", action="store_true",
                   help="on a GPU shared by packed trials (--gpus-per-trial below 1), run them under NVIDIA MPS: a daemon "
                        "of this search's own (nvidia-cuda-mps-control), stopped after it; the summary says where it "
                        "was not started, and why. Not yet measured: off by default")
    p.set_defaults(func=cmd_search)
    return p


def _subparsers(prog: str) -> dict[str, argparse.ArgumentParser]:
    parsers: dict[str, argparse.ArgumentParser] = {}

    p = argparse.ArgumentParser(prog=f"{prog} teacher", description="Train (or check) and cache the space's teacher.")
    p.add_argument("--space", default=None, help="space file or built-in name (default: default)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--cache", default=None, help="teacher cache folder (default: studies/teachers)")
    p.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    p.set_defaults(func=cmd_teacher)
    parsers["teacher"] = p

    p = argparse.ArgumentParser(prog=f"{prog} train", description="Run one plan and report its test accuracy.")
    p.add_argument("plan", nargs="?", default=None, help="plan YAML (e.g. an exported studies/NAME/plans/rank1.yaml)")
    p.add_argument("--method", default=None, help="single-method baseline: the method")
    p.add_argument("--epochs", type=int, default=None, help="single-method baseline: its epochs")
    p.add_argument("--space", default=None, help="single-method baseline: the space (default: default)")
    p.add_argument("--seed", type=int, default=None, help="override the plan's seed")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the plan's recorded count, else torch's); CPU numbers depend on it")
    p.add_argument("--out", default=None, help="output folder (default: studies/runs/<plan>-<hash>/)")
    p.add_argument("--resume", action="store_true", help="continue from the last stage checkpoint in --out")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on a GPU with native bf16 (compute capability 8.0+), fp16 with grad scaling on "
                        "older GPUs, fp32 on the CPU (default auto)")
    p.add_argument("--deterministic", action="store_true",
                   help="on a GPU, PyTorch's deterministic algorithms: the same bits on every run, slower (a CPU run "
                        "is bit-for-bit without it; a GPU run without it is close, not bit-for-bit)")
    p.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    p.set_defaults(func=cmd_train)
    parsers["train"] = p

    p = argparse.ArgumentParser(prog=f"{prog} methods", description="List the KD methods and their parameters.")
    p.set_defaults(func=cmd_methods)
    parsers["methods"] = p
    return {**parsers, **_inspect_parsers(prog)}


def _inspect_parsers(prog: str) -> dict[str, argparse.ArgumentParser]:
    """The commands that read studies and plans: dashboard, export, verify, report, studies."""
    parsers: dict[str, argparse.ArgumentParser] = {}
    p = argparse.ArgumentParser(prog=f"{prog} dashboard", description="Start optuna-dashboard on a study.")
    p.add_argument("study", nargs="?", default=None, help="study name (default: the most recently modified study)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.set_defaults(func=cmd_dashboard)
    parsers["dashboard"] = p

    p = argparse.ArgumentParser(prog=f"{prog} export", description="Write a study's best completed plans as YAML.")
    p.add_argument("study", help="study name (see `smskd-search studies`)")
    p.add_argument("--top", type=int, default=3, help="how many plans, best first (default 3)")
    p.add_argument("--out", default=None, help="folder (default: studies/<study>/plans/)")
    p.add_argument("--trial", type=int, default=None, help="export this completed trial only (trial<N>.yaml)")
    p.set_defaults(func=cmd_export)
    parsers["export"] = p

    p = argparse.ArgumentParser(prog=f"{prog} verify",
                                description="Re-run a plan, every single method of its space and its no-reference and "
                                            "uniform-weight twins at equal epochs on the same seeds; paired test "
                                            "accuracy differences with a verdict per row.")
    p.add_argument("plan", help="plan YAML (e.g. studies/NAME/plans/rank1.yaml)")
    p.add_argument("--seeds", type=int, default=5, help="the same fresh seeds for every row (default 5)")
    p.add_argument("--space", default=None,
                   help="compare with every single method of this space (default: the plan's provenance space, "
                        "else the plan's own methods)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the plan's recorded count)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs side by side, one process each (default: CPU cores / threads on a CPU, 1 on a GPU); "
                        "the numbers do not depend on it")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--no-cache", action="store_true",
                   help="train every stage (default: take stages from the studies folder's stage cache, and put "
                        "the ones trained there; the numbers are the same)")
    p.add_argument("--cache-max-gb", type=float, default=2.0, metavar="GB",
                   help="size cap of the stage cache, as for search: least recently used entries go first, "
                        "so give the search's cap when it had a larger one (default 2)")
    p.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    p.set_defaults(func=cmd_verify)
    parsers["verify"] = p

    p = argparse.ArgumentParser(prog=f"{prog} report", description="Write one self-contained HTML page about a study.")
    p.add_argument("study", help="study name")
    p.add_argument("--out", default=None, help="HTML file (default: studies/<study>/report.html)")
    p.set_defaults(func=cmd_report)
    parsers["report"] = p

    p = argparse.ArgumentParser(prog=f"{prog} studies", description="List the studies with trial counts and best value.")
    p.set_defaults(func=cmd_studies)
    parsers["studies"] = p
    return parsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "smskd-search"
    subs = _subparsers(prog)
    parser = subs[argv[0]] if argv and argv[0] in subs else _search_parser(prog)
    if argv and argv[0] in subs:
        argv = argv[1:]
    if argv and argv[0] == "search":
        argv = argv[1:]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
