"""The subcommands that read and manage what the store holds: runs (list, show, rename, tag, note, delete),
exports, label review and influence queries."""

from __future__ import annotations

import argparse
import sys


def open_store(args: argparse.Namespace):
    from app.store import Store, ensure_current

    store = Store(args.db)
    ensure_current(store.engine)
    return store


def runs_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    runs = store.list_runs(status=args.status, limit=args.limit, tag=args.tag, name=args.name)
    latest = store.latest_evaluations([r.id for r in runs])
    print(f"{'id':>5}  {'status':<9}  {'created (UTC)':<16}  {'LOO':>8}  {'test NLL':>8}  name [tags]")
    for r in runs:
        ev = latest.get(r.id)
        loo = "" if ev is None or ev.loo is None else f"{ev.loo:.4f}"
        nll = "" if ev is None or ev.metrics.get("test_nll") is None else f"{ev.metrics['test_nll']:.4f}"
        tags = f" [{', '.join(r.tags)}]" if r.tags else ""
        print(f"{r.id:>5}  {r.status:<9}  {r.created_at:%Y-%m-%d %H:%M}  {loo:>8}  {nll:>8}  {r.name}{tags}")
    return 0


def runs_update(args: argparse.Namespace) -> int:
    store = open_store(args)
    if args.runs_command == "rename":
        run = store.update_run(args.run, name=args.name)
    elif args.runs_command == "note":
        run = store.update_run(args.run, notes=args.text)
    else:
        current = set(store.get_run(args.run).tags or [])
        tags = current - set(args.tags) if args.remove else current | set(args.tags)
        run = store.update_run(args.run, tags=sorted(tags))
    print(f"run {run.id}: {run.name}" + (f" [{', '.join(run.tags)}]" if run.tags else ""))
    return 0


def runs_show(args: argparse.Namespace) -> int:
    import json

    from app.api.schemas import RunOut
    from app.store.calibration import calibration_summary

    store = open_store(args)
    run = store.get_run(args.run)
    step = store.latest_step(run.id)
    last = [None] if step is None else store.evaluations(run.id, since_step=step - 1, limit=1)
    fields = RunOut.model_validate(run).model_dump(mode="json")  # the API's shape: ISO 8601 UTC times, tags, notes
    config = fields.pop("config")
    print(json.dumps({**fields,
                      "last_evaluation": None if last[0] is None else {"step": last[0].step, "loo": last[0].loo,
                                                                        **last[0].metrics},
                      "calibration": calibration_summary(run.config, None if last[0] is None else last[0].metrics),
                      "config": config}, indent=2, default=str))
    return 0


def influence_query(args: argparse.Namespace) -> int:
    import json

    from worker.influence import query_run

    store = open_store(args)
    rows = query_run(store, args.run, args.test, args.checkpoint_dir, k=args.k, predicted=args.predicted,
                     step=args.step)
    request = {"test": args.test, "k": args.k, "predicted": args.predicted}
    store.record_influence(args.run, request if args.step is None else {**request, "step": args.step}, rows)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"test example {r['test_idx']}: label {r['label']}, predicted {r['predicted']}, loss {r['loss']:.4f} "
              f"(at {'the prediction' if args.predicted else 'its label'}; step {r['step']})")
        for title, key in (("removing raises the loss (proponents)", "proponents"),
                           ("removing lowers the loss (opponents)", "opponents")):
            print(f"  {title}:")
            for e in r[key]:
                flag = " flipped" if e["flipped"] else ""
                print(f"    train {e['idx']:>6}  label {e['label']}{flag:8}  {e['loss_change']:+.4g}")
    return 0


def review(args: argparse.Namespace) -> int:
    store = open_store(args)
    if args.clear:
        store.clear_review(args.run, args.idx)
        print(f"run {args.run}, example {args.idx}: unreviewed")
        return 0
    decision = "relabel" if args.relabel is not None else "drop" if args.drop else "keep"
    r = store.set_review(args.run, args.idx, decision, args.relabel, args.note)
    change = f" {r.given_label} -> {r.label}" if r.label is not None else ""
    print(f"run {args.run}, example {args.idx} (label {r.given_label}): {r.decision}{change}")
    return 0


def runs_delete(args: argparse.Namespace) -> int:
    from worker.checkpoints import Checkpoints

    store = open_store(args)
    uid = store.get_run(args.run).uid
    store.delete_run(args.run)
    Checkpoints(args.checkpoint_dir, uid).remove()
    print(f"run {args.run} deleted, with its checkpoints")
    return 0


def step_arg(value: str) -> int | None:
    if value == "latest":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is neither a step nor 'latest'")
    return int(value)


def export(args: argparse.Namespace) -> int:
    from app.store.export import table_bytes

    store = open_store(args)
    if args.corrected:
        from worker.corrected import write_corrected

        counts = write_corrected(store, args.run, args.corrected)
        print(f"run {args.run}: {args.corrected}: {counts['kept']} training examples ({counts['relabeled']} "
              f"relabeled, {counts['dropped']} dropped)", file=sys.stderr)
        return 0
    if args.reviews:
        step, cols = None, store.reviews_table(args.run)
    elif args.pred_probs:
        if args.step is not None:
            raise ValueError("--pred-probs exports the latest evaluation's class probabilities; drop --step")
        step, cols = store.class_probs_table(args.run)
    else:
        step = store.resolve_step(args.run, args.step)
        cols = store.examples_table(args.run, step)
    data = table_bytes(cols, args.format)
    if args.out in (None, "-"):
        if args.format == "parquet":
            raise ValueError("--format parquet needs --out FILE")
        sys.stdout.write(data.decode())
    else:
        with open(args.out, "wb") as f:
            f.write(data)
        print(f"run {args.run}, {'reviews' if step is None else f'step {step}'}: {args.out}", file=sys.stderr)
    return 0
