"""The ``ivon-diag`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from ivon_diag.store_commands import (
    export,
    influence_query,
    review,
    runs_delete,
    runs_list,
    runs_show,
    runs_update,
    step_arg,
)


def _demo(args: argparse.Namespace) -> int:
    if args.terminal:
        from ivon_diag.demo import run_demo

        run_demo(epochs=args.epochs, flip_fraction=args.flip, seed=args.seed)
        return 0
    from ivon_diag.demo import serve_demo

    return serve_demo(args.db or "sqlite:///ivon-diag-demo.db", epochs=args.epochs, flip_fraction=args.flip,
                      seed=args.seed, port=args.port)


def _validate(args: argparse.Namespace) -> int:
    try:
        from research.report import run_validation
    except ModuleNotFoundError as err:  # the production image ships the product only
        raise ValueError(f"validate needs the source checkout's research/ and `pip install -e '.[dev]'` "
                         f"({err})") from None

    run_validation(out_dir=args.out, quick=args.quick)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from app.store import make_engine, upgrade
    from app.store.migrate import current_revision

    engine = make_engine(args.db)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)}")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from app.store import Store, ensure_current

    store = Store(args.db)
    ensure_current(store.engine)
    print(store.create_token(args.name))
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from app.store import Store, ensure_current

    store = Store(args.db)
    ensure_current(store.engine)
    store.revoke_token(args.name)
    print(f"token {args.name!r} revoked")
    return 0


def _train(args: argparse.Namespace) -> int:
    from app.store import Store, ensure_current, make_engine, upgrade
    from worker import distributed
    from worker.config import load_config
    from worker.progress import console_log, forward_library_logs
    from worker.service import run_job

    cfg = load_config(args.config)
    distributed.init_from_env()  # under torchrun: data-parallel, rank 0 alone writes
    try:
        if distributed.rank() != 0:
            return _train_follower(cfg, distributed.broadcast(None), args.checkpoint_dir)
        try:
            engine = make_engine(args.db)
            upgrade(engine)
            store = Store(engine)
            ensure_current(store.engine)
            run = store.create_run(cfg.name, cfg.model_dump(mode="json"), enqueue=False)
        except BaseException:
            distributed.broadcast(None)  # the other ranks give up too
            raise
        distributed.broadcast((run.id, run.uid))
        log = console_log()
        forward_library_logs(log)
        log(f"run {run.id}: {cfg.name}", event="started", run=run.id, ranks=distributed.world())
        store.set_run_status(run.id, "running")
        state = run_job(store, run.id, args.checkpoint_dir, log=log, progress=sys.stderr.isatty())
        if state != "failed":
            store.set_run_status(run.id, state)
        log(f"run {run.id}: {state}", event="ended", run=run.id, status=state)
        return 0 if state == "done" else 1
    finally:
        distributed.shutdown()


def _train_follower(cfg, run: tuple[int, str] | None, checkpoint_dir: str) -> int:
    """A rank other than 0: train its share, write nothing; rank 0 reports the outcome."""
    from worker.trainer import JobFailed, Trainer

    if run is None:  # rank 0 could not create the run
        return 1
    try:
        Trainer(cfg, None, run[0], checkpoint_dir, run[1], log=lambda *a, **k: None).run()
    except JobFailed:
        return 1
    return 0


def _worker(args: argparse.Namespace) -> int:
    from app.store import Store, ensure_current
    from worker import distributed
    from worker.progress import console_log, forward_library_logs
    from worker.service import serve

    distributed.init_from_env()  # under torchrun: rank 0 claims, every rank trains its share
    try:
        store = Store(args.db) if distributed.rank() == 0 else None
        if store is not None:
            ensure_current(store.engine)
        log = console_log()
        forward_library_logs(log)
        serve(store, args.checkpoint_dir, worker_id=args.worker_id, lease_seconds=args.lease, once=args.once,
              log=log, progress=sys.stderr.isatty(), max_crashes=args.max_crashes)
    finally:
        distributed.shutdown()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ivon_diag.serve import serve

    return serve(args.db, args.host, args.port, args.graceful_seconds, args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivon-diag", description="Generalization and data-sensitivity "
                                     "diagnostics during training, from the IVON posterior.")
    db_help = "database URL (default: $IVON_DIAG_DB or sqlite:///ivon-diag.db)"
    parser.add_argument("--db", default=None, help=db_help)
    with_db = argparse.ArgumentParser(add_help=False)  # --db after the subcommand too
    with_db.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    sub = parser.add_subparsers(dest="command", required=True)
    run_help = "the run's id (ivon-diag runs list)"
    checkpoints = os.environ.get("IVON_DIAG_CHECKPOINT_DIR", "checkpoints")
    checkpoints_help = ("each run's resume state (removed when it ends) and final model, in a folder named by the "
                        "run's uid (default: $IVON_DIAG_CHECKPOINT_DIR or ./checkpoints)")
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", parents=[with_db],
                  help="migrate the database to this version's schema").set_defaults(func=_db_upgrade)
    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", parents=[with_db],
                              help="create a token (printed once; stored hashed)")
    create.add_argument("name", help="who or what holds the token (to revoke it by)")
    create.set_defaults(func=_token_create)
    revoke = token.add_parser("revoke", parents=[with_db], help="revoke every token of that name (at once: the next "
                              "request with it gets 403)")
    revoke.add_argument("name", help="the name given at create")
    revoke.set_defaults(func=_token_revoke)
    demo = sub.add_parser("demo", parents=[with_db],
                          help="train on digits with flipped labels and watch the diagnostics")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    demo.add_argument("--flip", type=float, default=0.1, help="fraction of training labels flipped")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, the flips and training (default 0)")
    demo.add_argument("--port", type=int, default=8000, help="the dashboard's port on 127.0.0.1 (default 8000)")
    demo.add_argument("--terminal", action="store_true", help="print the diagnostics instead of serving them")
    demo.set_defaults(func=_demo)
    runs = sub.add_parser("runs", help="list, show, rename, tag, annotate and delete runs").add_subparsers(
        dest="runs_command", required=True)
    ls = runs.add_parser("list", parents=[with_db], help="the newest runs first, with their latest LOO and test NLL")
    ls.add_argument("--status", choices=["queued", "running", "done", "failed", "cancelled"], help="runs in this state")
    ls.add_argument("--tag", help="runs carrying this tag")
    ls.add_argument("--name", help="runs whose name contains this")
    ls.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    ls.set_defaults(func=runs_list)
    ren = runs.add_parser("rename", parents=[with_db], help="give a run a new name")
    ren.add_argument("run", type=int, help=run_help)
    ren.add_argument("name", help="the new name (1 to 200 characters)")
    ren.set_defaults(func=runs_update)
    tag = runs.add_parser("tag", parents=[with_db], help="add tags to a run (or --remove them)")
    tag.add_argument("run", type=int, help=run_help)
    tag.add_argument("tags", nargs="+", help="letters, digits and _ . : - (at most 50 each, 20 per run)")
    tag.add_argument("--remove", action="store_true", help="remove these tags instead")
    tag.set_defaults(func=runs_update)
    note = runs.add_parser("note", parents=[with_db], help="set a run's notes (replacing them)")
    note.add_argument("run", type=int, help=run_help)
    note.add_argument("text", help="the notes (an empty string clears them)")
    note.set_defaults(func=runs_update)
    show = runs.add_parser("show", parents=[with_db], help="a run's status, config and last evaluation (JSON)")
    show.add_argument("run", type=int, help=run_help)
    show.set_defaults(func=runs_show)
    rm = runs.add_parser("delete", parents=[with_db], help="a run that is not running, its scores and checkpoints")
    rm.add_argument("run", type=int, help=run_help)
    rm.add_argument("--checkpoint-dir", default=checkpoints, help=checkpoints_help)
    rm.set_defaults(func=runs_delete)
    ex = sub.add_parser("export", parents=[with_db], help="an evaluation's per-example table (idx, rank, score, "
                        "LOO loss, mean LOO loss, label, flipped)")
    ex.add_argument("run", type=int, help=run_help)
    ex.add_argument("--step", type=step_arg, default=None, help="an evaluated step, or latest (default)")
    ex.add_argument("--format", choices=["csv", "parquet"], default="csv",
                    help="the table's format (default csv; parquet needs --out)")
    ex.add_argument("--out", default=None, help="a file (default: CSV to standard output)")
    what = ex.add_mutually_exclusive_group()
    what.add_argument("--pred-probs", action="store_true", help="instead, each example's LOO class probabilities at "
                      "the latest evaluation (idx, label, p_0 ... p_K-1): cleanlab's pred_probs")
    what.add_argument("--reviews", action="store_true", help="instead, the label review's decisions (idx, "
                      "given_label, flipped, decision, label, note)")
    what.add_argument("--corrected", metavar="OUT", help="instead, the corrected data set with the decisions applied, "
                      "as a job reads it back: OUT.npz (the training and test splits; any source but a factory) or "
                      "OUT.csv (a run on a CSV: the file itself, the decided rows changed)")
    ex.set_defaults(func=export)
    rv = sub.add_parser("review", parents=[with_db], help="decide on a training example: keep it (default), "
                        "relabel it or drop it from the corrected data set (export --corrected)")
    rv.add_argument("run", type=int, help=run_help)
    rv.add_argument("idx", type=int, help="the example's index in the run (as the API and exports name it)")
    how = rv.add_mutually_exclusive_group()
    how.add_argument("--relabel", type=int, metavar="CLASS", help="the new label")
    how.add_argument("--drop", action="store_true", help="leave it out of the corrected data set")
    how.add_argument("--clear", action="store_true", help="back to unreviewed")
    rv.add_argument("--note", default=None, help="why (kept with the decision and exported)")
    rv.set_defaults(func=review)
    inf = sub.add_parser("influence", parents=[with_db], help="which training examples made a finished run's "
                         "predictions on test examples (its final weights and posterior); stored for the dashboard")
    inf.add_argument("run", type=int, help=run_help)
    inf.add_argument("--test", type=int, nargs="+", required=True, help="indices into the run's test split")
    inf.add_argument("--k", type=int, default=10, help="proponents and opponents per test example (default 10)")
    inf.add_argument("--predicted", action="store_true", help="the loss at the predicted label, not the test label")
    inf.add_argument("--step", type=int, default=None, help="at this evaluation's kept state (the job config's "
                     "sensitivity.keep_states newest), not the final model")
    inf.add_argument("--json", action="store_true", help="JSON instead of a table")
    inf.add_argument("--checkpoint-dir", default=checkpoints, help=checkpoints_help)
    inf.set_defaults(func=influence_query)
    sv = sub.add_parser("serve", parents=[with_db], help="the REST API and the dashboard")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="default 8000")
    sv.add_argument("--graceful-seconds", type=float, default=30.0,
                    help="on SIGTERM, how long requests in flight may take to finish")
    sv.add_argument("--workers", type=int, default=1,
                    help="server processes sharing the port (one Python process answers on about one core; "
                         "default 1)")
    sv.set_defaults(func=_serve)
    tr = sub.add_parser("train", parents=[with_db],
                        help="run one job in the foreground from a JSON, YAML or TOML config")
    tr.add_argument("config", help="the job: a JSON, YAML or TOML file (docs/usage.md lists its fields)")
    tr.add_argument("--checkpoint-dir", default=checkpoints, help=checkpoints_help)
    tr.set_defaults(func=_train)
    wk = sub.add_parser("worker", parents=[with_db], help="claim and run jobs from the store")
    wk.add_argument("--checkpoint-dir", default=checkpoints, help=checkpoints_help)
    wk.add_argument("--worker-id", default=None,
                    help="the name the store records as the job's holder (default: host:pid)")
    wk.add_argument("--lease", type=float, default=60.0, help="seconds before a silent worker's job is retaken")
    wk.add_argument("--once", action="store_true", help="exit when the queue is empty")
    wk.add_argument("--max-crashes", type=int, default=3, help="a job whose worker died this many times (its lease "
                    "expired) is failed instead of retaken, so that the queue moves on")
    wk.set_defaults(func=_worker)
    val = sub.add_parser("validate", help="write docs/validation.md: how faithful the LOO and sensitivities are")
    val.add_argument("--out", default="docs", help="folder for validation.md and its JSON (default docs)")
    val.add_argument("--quick", action="store_true", help="a reduced run (minutes), for smoke tests")
    val.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from app.store.engine import StoreError
    from worker.allocator import keep_heap

    args = build_parser().parse_args(argv)
    try:
        keep_heap()  # training and sensitivity passes reuse large buffers: keep them out of page faults
        return args.func(args)
    except (ValueError, FileNotFoundError, StoreError) as err:
        print(f"ivon-diag {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
