"""Small command line for the Makefile: demo data, the default run date, the run summary.

python -m pipeline.cli demo-data        # fetch MovieLens-100k into an empty landing folder
python -m pipeline.cli default-date     # the day after the last landing event
python -m pipeline.cli summary DATE     # what the run for DATE did, and a sample list
python -m pipeline.cli ingest           # landing files -> lake now (between nightly runs)
python -m pipeline.cli repair FILE|SHA256 [--dry-run] [--allow-resend]  # take back all one
                                        # landing file brought into the lake, to re-send it
python -m pipeline.cli monitor-summary DATE  # what the monitor found for DATE
python -m pipeline.cli impact-summary DATE   # what the impact run found for DATE
python -m pipeline.cli airflow-secrets FILE  # one JWT secret and Fernet key for local Airflow
python -m pipeline.cli pseudonym-key FILE    # a user-id pseudonymisation key (demo), once
python -m pipeline.cli rekey --new-key-file F [--dry-run]  # rotate the pseudonym key: lake,
                                        # quarantine, served history, mapping
python -m pipeline.cli simulate-day DATE [--days N] [--seed S]  # simulated CMS day(s) of
                                        # the served lists -> landing/events (demo data)
python -m pipeline.cli experiment start|change|stop --config FILE --by NAME [--reason TEXT]
                                  [--force]  # record an A/B experiment, save its config
python -m pipeline.cli forget-user --user-id U [--user-id U2 ...] | --from-file F
                       --by NAME [--reason TEXT] [--dry-run]  # right to erasure
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import logging
import os
import secrets
import sys
from pathlib import Path

from pipeline.core.config import Settings, as_utc, untrained_event_types
from pipeline.core.files import write_once

logger = logging.getLogger(__name__)

#: Landing files of the demo's simulated CMS feedback (``simulate-day``).
SIMULATED_PREFIX = "simulated-"


def serving_dsn() -> str | None:
    """The ``recs_serving`` connection from the environment, as Airflow would read it.

    Parsed by Airflow's own ``Connection`` (JSON or URI, as its environment-variable secrets
    backend does) and rendered with ``get_uri()``, as the DAGs' tasks get it: every part is
    URL-quoted, so a login or password holding ``@ : / %`` survives. The scheme is
    ``postgres://`` (Airflow's spelling; :mod:`pipeline.serving` takes it); a JSON connection
    without ``conn_type`` is taken as postgres, the serving database's type.
    """
    raw = os.environ.get("AIRFLOW_CONN_RECS_SERVING", "").strip()
    if not raw:
        return None
    # Airflow only here, imported when needed: the pipeline package does not import it, and
    # this is a command-line entry point, run where Airflow is installed.
    from airflow.sdk import Connection

    _logs_to_stderr()  # importing Airflow routed logging to stdout, which is for results
    if raw.startswith("{"):
        conn = Connection.from_json(raw, conn_id="recs_serving")
        conn.conn_type = conn.conn_type or "postgres"
    else:
        conn = Connection.from_uri(raw, conn_id="recs_serving")
    return conn.get_uri()


def _logs_to_stderr() -> None:
    """Send log records to stderr again. Importing Airflow installs its own handler, which
    prints to stdout; this command line prints its results there (``ingest``'s JSON report is
    read by loaders), so its logs must stay on stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


#: Secrets every Airflow component must share (a component that finds one empty generates its
#: own, and then tasks fail with "Invalid auth token"), with a generator of the right length.
AIRFLOW_SECRETS = {
    "AIRFLOW__API_AUTH__JWT_SECRET": lambda: secrets.token_urlsafe(64),  # 64 bytes for HS512
    "AIRFLOW__CORE__FERNET_KEY": lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    "AIRFLOW__API__SECRET_KEY": lambda: secrets.token_urlsafe(32),
}


def airflow_secrets(path: Path) -> int:
    """Write ``path`` once (mode 0600) with a fresh JWT secret, Fernet key and API secret key
    for a local Airflow; an existing file is kept, so every component and every start shares
    the same values. The file is shell syntax for ``set -a; . FILE``, and a variable already
    in the environment (production: set by the deployment or a secrets backend) wins."""
    if path.exists():
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Local Airflow secrets, generated once by `python -m pipeline.cli airflow-secrets`.",
        "# Never commit this file. Load it with: set -a; . ./airflow-secrets.env; set +a",
        "# A variable already set in the environment wins over the value here.",
    ]
    lines += [f"{name}=${{{name}:-{make()}}}" for name, make in AIRFLOW_SECRETS.items()]
    if write_once(path, "\n".join(lines) + "\n"):  # a concurrent writer's file stays
        print(f"generated Airflow secrets (JWT secret, Fernet key) in {path}")
    return 0


def pseudonym_key_file(path: Path) -> int:
    """Write ``path`` once (mode 0600) with a fresh pseudonymisation key (64 hex digits: 256
    bits) for ``RECS_PSEUDONYM_KEY_FILE``; an existing file is kept (a new key would change
    every stored id: README, "Pseudonymised ids"). For the demo; production keeps its key in
    an Airflow Variable or connection or a secrets manager."""
    if write_once(path, secrets.token_hex(32) + "\n"):
        print(f"generated a user-id pseudonymisation key in {path} (never commit it)")
    return 0


def rekey(settings: Settings, new_key_file: Path, *, dry_run: bool = False) -> int:
    """Rotate the pseudonymisation key (:func:`pipeline.serving.pseudonyms.rekey`); prints
    the counts. 1 when the new key file is unusable."""
    from pipeline.core.config import load_pseudonym_key
    from pipeline.core.errors import ConfigError
    from pipeline.serving.pseudonyms import rekey as rekey_ids

    try:
        new_key = load_pseudonym_key({"RECS_PSEUDONYM_KEY_FILE": str(new_key_file)})
        if new_key is None:
            raise ConfigError(f"{new_key_file} holds no key")
        result = rekey_ids(settings, new_key, dsn=serving_dsn(), dry_run=dry_run)
    except (ConfigError, ValueError) as exc:
        print(f"rekey failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    if not dry_run:
        print(
            f"now configure the key of {new_key_file} everywhere (RECS_PSEUDONYM_KEY_FILE, "
            "or the Airflow Variable recs_pseudonym_key) before the next ingest, and run "
            "the nightly",
            file=sys.stderr,
        )
    return 0


def demo_data(settings: Settings) -> int:
    """Write MovieLens-100k to the landing folder unless it already holds event files."""
    from pipeline.lake.demo.movielens import write_demo_landing
    from pipeline.lake.readers import list_landing_files

    existing = list_landing_files(settings.landing_events_dir)
    if existing:
        print(f"landing folder has {len(existing)} event file(s); not fetching demo data")
        return 0
    data = write_demo_landing(settings.cache_dir, settings.landing_dir)
    print(
        f"demo data: MovieLens-100k, {len(data.events):,} events, {len(data.items):,} items, "
        f"{len(data.users):,} users -> {settings.landing_dir}"
    )
    from pipeline.lake.demo.hostile import write_hostile_landing

    bad = write_hostile_landing(data.events, settings.landing_events_dir)
    print(
        f"  plus {len(bad)} hostile files (odd formats of the same events, and "
        f"{sum(bad.values())} bad rows for quarantine): {', '.join(sorted(bad))}"
    )
    return 0


def default_date(settings: Settings) -> int:
    """Print the day after the newest event in the landing files; the demo's simulated CMS
    feedback (``simulated-*``) does not count, so that ``make run`` keeps its date."""
    from pipeline.lake.mapping import load_column_mapping
    from pipeline.lake.normalise import parse_timestamps
    from pipeline.lake.readers import landing_files, read_event_file

    mapping = load_column_mapping(
        settings.landing_dir / "column_mapping.json", settings.column_mapping
    )
    newest = max(
        (
            parse_timestamps(read_event_file(p, mapping.for_file(p.name))["timestamp"]).max()
            for p in landing_files(settings.landing_events_dir)
            if not p.name.startswith(SIMULATED_PREFIX)
        ),
        default=None,
    )
    if newest is None or newest != newest:
        print(dt.date.today().isoformat())
    else:
        print((newest.date() + dt.timedelta(days=1)).isoformat())
    return 0


def summary(settings: Settings, date: str) -> int:
    """Print the run's stage results and one sample user's published list."""
    from pipeline.lake.readers import read_side_file
    from pipeline.serving.store import read_user_list

    cutoff = as_utc(date)
    run = settings.run_dir(cutoff)
    stages = {}
    for name in (
        "ingest",
        "validate",
        "build_features",
        "train",
        "evaluate",
        "register",
        "publish",
    ):
        path = run / f"{name}.json"
        stages[name] = json.loads(path.read_text()) if path.exists() else None
    missing = [name for name, result in stages.items() if result is None]
    if missing:
        print(f"run for {date} is incomplete: no result for {', '.join(missing)} in {run}")
        return 1
    ing, val, eva, reg, pub = (
        stages[s] for s in ("ingest", "validate", "evaluate", "register", "publish")
    )
    lines = [
        f"Run summary for {date} (events before {cutoff.isoformat()})",
        f"  ingest     {ing['files']} file(s), {ing['rows_read']:,} rows read, "
        f"{ing['rows_new']:,} new in lake, {ing['snapshot_rows']:,} in the run's window",
        f"  validate   {'passed' if val['passed'] else 'FAILED'}: {val['rows']:,} rows, "
        f"{val['bad_rows']:,} quarantined ({val['bad_share']:.2%})",
        f"  features   {stages['build_features']['users']:,} users, "
        f"{stages['build_features']['items']:,} items",
        f"  train      two-stage: ALS/kNN/popular candidates + XGBoost ranker, "
        f"{stages['train']['pairs']:,} user-item pairs "
        f"({stages['train']['users']:,} users x {stages['train']['items']:,} items)",
        f"  evaluate   holdout = last {eva['holdout_days']} days, {eva['users']} warm users, "
        f"@{eva['k']}:",
    ]
    lines += _metrics_table(eva["metrics"], eva["k"])
    m, k = eva["metrics"], eva["k"]
    if "model_auc" in m:
        lines.append(
            f"    ranker AUC-ROC {m['model_auc']:.3f}, PR-AUC {m['model_pr_auc']:.3f}, "
            f"candidate recall {m['model_candidate_recall']:.3f}; "
            f"{int(m.get('model_cold_users', 0))} new users: nDCG@{k} "
            f"{m.get(f'model_cold_ndcg_at_{k}', float('nan')):.4f} vs 30-day popularity "
            f"{m.get(f'popularity_30d_cold_ndcg_at_{k}', float('nan')):.4f}"
        )
    lines += [
        f"  register   {reg['decision']}: {reg['reason']}; version {reg['version']} "
        f"{_version_role(reg)}; "
        f"champion = v{reg['champion_version']}",
        (
            f"  publish    {pub['rows']:,} rows for {pub['users']:,} users (incl. __default__) "
            f"from model v{pub['model_version']} -> {pub['target']}"
            if pub.get("published", True)
            else f"  publish    nothing published: {pub['reason']}"
        ),
    ]
    sample = _sample_user(run)
    if sample is not None:
        from pipeline.serving.pseudonyms import to_cms_ids

        # the run holds stored ids (pseudonyms with a key), the view the CMS's: looked up by
        # the CMS id, printed by the stored one (no CMS id on the terminal or in a log)
        cms_id = (
            to_cms_ids([sample], dsn=serving_dsn(), sqlite_path=settings.serving_sqlite_path)[0]
            or sample
        )
        rows = read_user_list(cms_id, dsn=serving_dsn(), sqlite_path=settings.serving_sqlite_path)
        items = read_side_file(settings.landing_dir / "items.csv")
        titles = (
            items.set_index("item_id")["title"].to_dict()
            if items is not None and "title" in items
            else {}
        )
        lines.append(f"  sample     user {sample}:")
        lines += [
            f"    {r.rank:>2}. {str(titles.get(r.item_id, r.item_id))[:38]:<40}{r.reason}"
            for r in rows.itertuples()
        ]
    print("\n".join(lines))
    return 0


def _version_role(registered: dict) -> str:
    if registered["promoted"]:
        return "promoted to champion"
    if registered.get("decision") == "backfill":
        return "recorded, not a candidate (backfill)"
    return "is challenger"


def _metrics_table(metrics: dict, k: int) -> list[str]:
    names = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")
    models = sorted(
        {
            key.split("_")[0] if not key.startswith("popularity_30d") else "popularity_30d"
            for key in metrics
        },
        key=lambda m: (m != "model", m),
    )
    rows = [f"    {'method':<16}" + "".join(f"{n:>11}" for n in names)]
    for model in models:
        rows.append(
            f"    {model:<16}"
            + "".join(f"{metrics.get(f'{model}_{n}_at_{k}', float('nan')):>11.4f}" for n in names)
        )
    return rows


def _sample_user(run) -> str | None:
    from pipeline.core.ids import EncodedEvents

    events = EncodedEvents.read(run, ("user_id",))
    if not len(events):
        return None
    counts = events.frame["user_id"].value_counts()
    return str(events.users.decode(counts.index[len(counts) // 2 :][:1])[0])  # typical user


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo-data", help="fetch MovieLens-100k into an empty landing folder")
    sub.add_parser("default-date", help="the day after the newest landing event")
    run = sub.add_parser("summary", help="summarise the run for DATE")
    run.add_argument("date", help="the run's logical date, YYYY-MM-DD")
    sub.add_parser(
        "ingest",
        help="ingest the landing files into the lake now (then post a "
        "recs://lake/events Asset event to run the monitor)",
    )
    fix = sub.add_parser(
        "repair",
        help="remove everything one landing file brought into the lake",
        description="Take back one ingested landing file, by its manifest entry: its lake rows "
        "(other files' rows stay), their event-id and content hash caches, its "
        "quarantine file and its manifest entry (moved, with what was removed, to "
        "lake/_repairs.jsonl). A corrected re-send is then ingested normally; the "
        "file's exact bytes are skipped by ingest unless --allow-resend. See the "
        "README, 'Repairing the lake'.",
    )
    fix.add_argument(
        "file",
        metavar="FILE|SHA256",
        help="the landing file's name as the manifest records it, or its sha256 "
        "(or a prefix of at least 12 hex digits)",
    )
    fix.add_argument(
        "--dry-run", action="store_true", help="print what would be removed; change nothing"
    )
    fix.add_argument(
        "--allow-resend",
        action="store_true",
        help="let these exact bytes be ingested again (e.g. after fixing the column mapping)",
    )
    imp = sub.add_parser("impact-summary", help="what the impact run found for DATE")
    imp.add_argument("date", help="the impact run's as-of date, YYYY-MM-DD")
    mon = sub.add_parser("monitor-summary", help="what the monitor found for DATE")
    mon.add_argument("date", help="the monitor's as-of date, YYYY-MM-DD")
    keys = sub.add_parser(
        "airflow-secrets", help="write FILE with shared Airflow secrets unless it exists"
    )
    keys.add_argument("file", type=Path)
    pkey = sub.add_parser(
        "pseudonym-key",
        help="write FILE with a new user-id pseudonymisation key unless it "
        "exists (for RECS_PSEUDONYM_KEY_FILE)",
    )
    pkey.add_argument("file", type=Path)
    sim = sub.add_parser(
        "simulate-day",
        help="simulate the CMS on DATE (and the next N-1 "
        "days) for the served lists; write the events "
        "to landing/events/simulated-DATE.csv.gz",
    )
    sim.add_argument("date", type=_iso_date, help="the first simulated day, YYYY-MM-DD")
    sim.add_argument("--days", type=_positive_int, default=1, help="days to simulate (1)")
    sim.add_argument("--seed", type=int, default=0, help="the simulation's seed (0)")
    exp = sub.add_parser(
        "experiment",
        help="start, change or stop the A/B experiment publish serves",
        description="Record an A/B experiment's start, change or stop in the serving DB's "
        "experiments table (the recs_serving connection, else the SQLite file) and "
        "save its config as $RECS_DATA_DIR/experiments/<name>.json. The next "
        "publish serves each user from their variant.",
    )
    exp.add_argument("action", choices=("start", "change", "stop"))
    exp.add_argument(
        "--config",
        type=Path,
        required=True,
        help="the experiment's JSON config: for start, the new experiment; for "
        "change, the edited config (new shares, added variants, or status "
        "stopped); for stop, any config naming the experiment",
    )
    exp.add_argument("--by", required=True, help="who makes the change (recorded)")
    exp.add_argument("--reason", default=None, help="why (recorded)")
    exp.add_argument(
        "--force",
        action="store_true",
        help="change only: allow shrinking a variant (its released users move to "
        "the default; recorded as forced)",
    )
    forget = sub.add_parser(
        "forget-user",
        help="forget users: lake, quarantine, runs, served history, serving DB",
        description="Right to erasure: remove the users' events and lists everywhere the "
        "pipeline keeps them, add them to the ingest tombstone (an old landing "
        "file cannot bring them back) and record the erasure (counts only) in the "
        "serving DB's erasures table. See the README, 'Privacy'.",
    )
    who = forget.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--user-id",
        action="append",
        dest="user_ids",
        metavar="U",
        help="a user id as the CMS knows it (repeat for more)",
    )
    who.add_argument("--from-file", type=Path, metavar="F", help="a file with one user id per line")
    forget.add_argument("--by", required=True, help="who asked for it (recorded)")
    forget.add_argument("--reason", default=None, help="why: the ticket or request (recorded)")
    forget.add_argument(
        "--dry-run",
        action="store_true",
        help="count what would be removed; change and record nothing",
    )
    rot = sub.add_parser(
        "rekey",
        help="rotate the user-id pseudonymisation key (lake, quarantine, served history, mapping)",
        description="Rewrite every stored user id (lake parts, quarantine, served-list "
        "history) from its current pseudonym to the new key's, through the serving "
        "DB's user_pseudonyms table (the recs_serving connection, else SQLite), "
        "which gets the new pairs. Stop the DAGs first; afterwards configure the "
        "new key everywhere and run the nightly. See the README, 'Rotating the "
        "key'.",
    )
    rot.add_argument(
        "--new-key-file",
        type=Path,
        required=True,
        metavar="F",
        help="a file holding the new key (e.g. from `pseudonym-key F`)",
    )
    rot.add_argument(
        "--dry-run", action="store_true", help="count what would be rewritten; change nothing"
    )
    args = parser.parse_args(argv)
    if args.command == "airflow-secrets":
        return airflow_secrets(args.file)
    if args.command == "pseudonym-key":
        return pseudonym_key_file(args.file)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if args.command == "demo-data":
        return demo_data(settings)
    if args.command == "default-date":
        return default_date(settings)
    if args.command == "ingest":
        return ingest(settings)
    if args.command == "repair":
        return repair(settings, args.file, dry_run=args.dry_run, allow_resend=args.allow_resend)
    if args.command == "impact-summary":
        return impact_summary(settings, args.date)
    if args.command == "monitor-summary":
        return monitor_summary(settings, args.date)
    if args.command == "simulate-day":
        return simulate_days(settings, args.date, days=args.days, seed=args.seed)
    if args.command == "rekey":
        return rekey(settings, args.new_key_file, dry_run=args.dry_run)
    if args.command == "forget-user":
        return forget_user(
            settings,
            args.user_ids,
            args.from_file,
            requested_by=args.by,
            reason=args.reason,
            dry_run=args.dry_run,
        )
    if args.command == "experiment":
        return experiment(
            settings,
            args.action,
            args.config,
            changed_by=args.by,
            reason=args.reason,
            force=args.force,
        )
    return summary(settings, args.date)


def experiment(
    settings: Settings,
    action: str,
    config: Path,
    *,
    changed_by: str,
    reason: str | None = None,
    force: bool = False,
    dsn: str | None = None,
) -> int:
    """Start, change or stop an A/B experiment: record it in the serving DB's ``experiments``
    table (which refuses what the rules forbid: a second running experiment, a change that
    moves users between groups unless forced, ...) and save the recorded config to
    ``$RECS_DATA_DIR/experiments/<name>.json``. ``dsn`` None: the ``recs_serving`` connection
    from the environment, else the SQLite file. 0 when recorded (or already recorded), 1 when
    refused or the config is bad (the reason on stderr)."""
    from pipeline.core.errors import ServingError
    from pipeline.serving.experiments import Experiment, ExperimentError, experiment_path
    from pipeline.serving.store import read_experiments, record_experiment

    if force and action != "change":
        print(f"experiment {action}: --force applies to a change only", file=sys.stderr)
        return 1
    dsn = dsn if dsn is not None else serving_dsn()
    target = {"dsn": dsn, "sqlite_path": settings.serving_sqlite_path}
    try:
        try:
            proposed = json.loads(config.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ExperimentError(f"cannot read experiment config {config}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ExperimentError(
                f"experiment config {config}: invalid JSON at line "
                f"{exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        if action == "start":
            new = Experiment.load(config).start()
            current = None
        else:
            name = proposed.get("name") if isinstance(proposed, dict) else None
            records = read_experiments(name=name, **target) if isinstance(name, str) else None
            if records is None or records.empty:
                raise ExperimentError(
                    f"experiment {name!r} ({config}) was never started: start it first"
                )
            current = Experiment.from_dict(records["config"].iloc[-1])
            new = (
                current.apply_config(proposed, force=force)
                if action == "change"
                else current.stop()
            )
        if new is current:
            print(
                f"experiment {new.name}: nothing to {action} (version {new.version} is "
                f"{new.status}); nothing recorded"
            )
            return 0
        if action == "change" and not new.running:
            action = "stop"  # the edited config said status: stopped
        record_id = record_experiment(new, action, changed_by, reason, **target)
        path = new.save(experiment_path(settings.data_dir, new.name))
    except (ExperimentError, ServingError) as exc:
        print(f"experiment {action} refused: {exc}", file=sys.stderr)
        return 1
    change = (new.last_change or {}).get("summary", new.status)
    print(
        f"experiment {new.name} version {new.version}: {action} recorded (id {record_id}) by "
        f"{changed_by}: {change}; config saved to {path}"
    )
    for warning in new.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def forget_user(
    settings: Settings,
    user_ids: list[str] | None,
    from_file: Path | None,
    *,
    requested_by: str,
    reason: str | None = None,
    dry_run: bool = False,
    dsn: str | None = None,
) -> int:
    """Forget users (:func:`pipeline.serving.erasure.forget_users`) and print the counts per store
    (never the ids). ``dsn`` None: the ``recs_serving`` connection from the environment, else
    the SQLite file. 0 when done (or nothing was left), 1 when the ids or the database fail
    (a retry completes an interrupted erasure)."""
    from pipeline.core.errors import ServingError
    from pipeline.serving.erasure import forget_users

    try:
        if from_file is not None:
            try:
                lines = from_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read {from_file}: {exc}") from None
            user_ids = [line.strip() for line in lines if line.strip()]
        result = forget_users(
            settings,
            user_ids or [],
            requested_by=requested_by,
            reason=reason,
            dsn=dsn if dsn is not None else serving_dsn(),
            dry_run=dry_run,
        )
    except (ValueError, ServingError) as exc:
        print(f"forget-user failed: {exc}", file=sys.stderr)
        return 1
    head = (
        "dry run, nothing changed: would remove"
        if dry_run
        else f"erasure {result['request_id']} recorded (id {result['erasure_id']})"
        if result["recorded"]
        else f"erasure {result['request_id']} was already recorded (id {result['erasure_id']})"
    )
    print(f"forget-user: {result['users']} user id(s); {head}:")
    for store, count in sorted(result["removed"].items()):
        print(f"  {store:<24}{count:>10,}")
    versions = ", ".join(result["model_versions"]) or "none found"
    print(f"  model versions trained on their data (replaced by the next nightly): {versions}")
    return 0


def repair(
    settings: Settings, target: str, *, dry_run: bool = False, allow_resend: bool = False
) -> int:
    """Take back one landing file from the lake (:mod:`pipeline.lake.repair`) and print what
    was (or, ``dry_run``, would be) removed. 1 when refused (no such manifest entry, an
    ambiguous name; the reason, naming the file, on stderr)."""
    from pipeline.core.errors import DataError
    from pipeline.lake.repair import repair_landing_file

    try:
        result = repair_landing_file(
            settings.lake_events_dir, target, dry_run=dry_run, allow_resend=allow_resend
        )
    except DataError as exc:
        print(f"repair refused: {exc}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0


def ingest(settings: Settings) -> int:
    """Landing files -> lake; prints the report. 1 when a file failed (named). With a
    pseudonym key, the mapping goes to the ``recs_serving`` connection's DB (else SQLite), as
    the nightly's ``ingest`` does."""
    from pipeline.core.errors import DataError
    from pipeline.lake.ingest import ingest_lake
    from pipeline.serving.pseudonyms import pseudonym_recorder

    try:
        report = ingest_lake(
            settings,
            record_pseudonyms=pseudonym_recorder(serving_dsn(), settings.serving_sqlite_path),
        )
    except DataError as exc:
        print(f"ingest failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2, default=str))
    return 0


def impact_summary(settings: Settings, date: str) -> int:
    """Print what ``recommendations_impact`` found for ``date``, per variant."""
    from pipeline.monitoring.report import format_impact

    return _print_summary(settings, "impact", date, format_impact)


def monitor_summary(settings: Settings, date: str) -> int:
    """Print what ``recommendations_monitor`` found for ``date``."""
    from pipeline.monitoring.report import format_summary

    return _print_summary(settings, "monitoring", date, format_summary)


def _print_summary(settings: Settings, folder: str, date: str, formatter) -> int:
    """Print ``$RECS_DATA_DIR/<folder>/<date>/summary.json`` through ``formatter``."""
    path = settings.data_dir / folder / f"{as_utc(date):%Y-%m-%d}" / "summary.json"
    if not path.exists():
        print(f"no {folder} run for {date} ({path} is missing)")
        return 1
    print(formatter(json.loads(path.read_text())))
    return 0


def simulate_days(settings: Settings, day: dt.date, *, days: int = 1, seed: int = 0) -> int:
    """Simulate the CMS on ``day`` and the ``days - 1`` following days for the served lists
    and write the events as ``landing/events/simulated-<day>.csv.gz`` (next ingest takes it).

    The users' tastes are an empirical stand-in (:func:`pipeline.lake.demo.simulate.
    empirical_truth`) built from the lake's events in the ``lookback_days`` before ``day``
    (event types that train nothing, impressions, left out) and ``landing/items.csv``; each
    day plays the served-list set live at its start (:func:`pipeline.lake.served.
    read_served`). Listed users without events are skipped and counted. 1 when there is
    nothing to simulate (no served lists, no events).

    The lake and the served history hold stored ids (pseudonyms with a key); a CMS knows only
    its own ids, so the events' ``user_id`` is mapped back through the serving DB's
    ``user_pseudonyms`` (the ``recs_serving`` connection, else SQLite) before the file is
    written: the next ingest pseudonymises them again, as it does the CMS's real feedback.
    Events of a pseudonym without a row are left out and counted."""
    from pipeline.lake.demo.simulate import (
        empirical_truth,
        observed_ctr,
        simulate_served,
        write_simulated_events,
    )
    from pipeline.lake.readers import read_side_file
    from pipeline.lake.served import read_served
    from pipeline.lake.snapshot import load_snapshot

    start = as_utc(day)
    lake_root = settings.lake_events_dir.parent
    served = read_served(lake_root, start, start + dt.timedelta(days=days))
    if served.empty:
        print(
            f"no served lists live at {day.isoformat()} in {lake_root / 'served'}: run the "
            "nightly (publish) first",
            file=sys.stderr,
        )
        return 1
    events = load_snapshot(settings.lake_events_dir, start, settings.lookback_days)
    if events.empty:
        print(
            f"no events in the lake in the {settings.lookback_days} days before "
            f"{day.isoformat()}: no tastes to simulate",
            file=sys.stderr,
        )
        return 1
    truth = empirical_truth(
        events,
        read_side_file(settings.landing_dir / "items.csv"),
        exclude_event_types=untrained_event_types(settings.event_weights),
    )
    del events
    result = simulate_served(truth, served, day, days, seed=seed)
    simulated, unmapped = _as_cms_events(settings, result.events)
    path = write_simulated_events(
        simulated, settings.landing_events_dir / f"{SIMULATED_PREFIX}{day.isoformat()}.csv.gz"
    )
    counts = simulated["event_type"].value_counts()
    line = (
        f"simulated {days} day(s) from {day.isoformat()} (seed {seed}): "
        f"{result.users:,} users, {simulated['session_id'].nunique():,} visits, "
        f"{counts.get('impression', 0):,} impressions, {counts.get('click', 0):,} clicks, "
        f"{counts.get('add_to_cart', 0):,} carts, {counts.get('purchase', 0):,} purchases"
    )
    if "variant" in simulated and len(simulated):
        ctr = observed_ctr(simulated)
        line += " (CTR " + ", ".join(f"{name} {value:.2%}" for name, value in ctr.items()) + ")"
    if result.skipped_rows:
        line += (
            f"; skipped {result.skipped_users:,} listed user(s) without events "
            f"({result.skipped_rows:,} list rows of users or items unknown to the truth)"
        )
    if unmapped:
        line += f"; {unmapped:,} event(s) of pseudonyms without a mapping left out"
    if any(cutoff is None for cutoff in result.cutoffs):
        line += f"; {sum(c is None for c in result.cutoffs)} day(s) without a live list set"
    print(f"{line} -> {path}")
    return 0


def _as_cms_events(settings: Settings, events):
    """``events`` with ``user_id`` as the CMS knows it (pseudonyms mapped back through the
    serving DB's ``user_pseudonyms``), and how many events were left out for lack of a row."""
    import numpy as np
    import pandas as pd

    from pipeline.serving.pseudonyms import to_cms_ids

    if not len(events):
        return events, 0
    codes, uniques = events["user_id"].factorize()
    cms = to_cms_ids(
        np.asarray(uniques, dtype=object),
        dsn=serving_dsn(),
        sqlite_path=settings.serving_sqlite_path,
    )
    keep = np.array([c is not None for c in cms], dtype=bool)[codes]
    out = events[keep].copy()
    out["user_id"] = pd.Series(cms[codes[keep]], index=out.index, dtype=object).astype(
        events["user_id"].dtype
    )
    return out, int((~keep).sum())


def _iso_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
