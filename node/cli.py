"""The `cxrnode` command: parses its arguments, then calls one function per subcommand."""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.errors import ModelsError
from node.config import ConfigError, Settings, describe, load_settings, parse_address
from node.service import StartupError

log = logging.getLogger(__name__)

EXIT_USAGE = 2

DESCRIPTION = """\
cxrnode receives chest X-rays by DICOM C-STORE, finds lung opacity with a Mask R-CNN, measures how much of each
lung is involved, and sends the findings back as DICOM Segmentation, Structured Report and presentation state.

Start here:
  cxrnode serve --destination PACS@10.0.0.5:104    run the node (AE title CXRNODE, port 11112)
  cxrnode echo CXRNODE@127.0.0.1:11112             check that a DICOM peer answers
  cxrnode send CXRNODE@127.0.0.1:11112 FOLDER      send images like a modality would
  cxrnode jobs                                     what the node received and what became of it

Every command has its own --help. Configuration: config/node.toml (check a file with `cxrnode config check`).
"""

# The calling AE title of `cxrnode send` by default: not the node's own (CXRNODE), so that jobs sent by hand do not
# look as if the node had sent them to itself.
SEND_CALLING_AE = "CXRNODE-SEND"


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML configuration file (default: $CXRNODE_CONFIG or built-in defaults)"
    )
    parser.add_argument("--data-dir", type=Path, help="where the spool, queue and results live")
    parser.add_argument(
        "--queue",
        metavar="URL",
        help="the job queue: sqlite:///PATH (default data_dir/queue.sqlite) or postgresql://...",
    )


def _settings(args: argparse.Namespace, extra: dict[str, object] | None = None) -> Settings:
    overrides: dict[str, object] = {
        "node.data_dir": str(args.data_dir) if args.data_dir else None,
        "queue.url": args.queue,
    }
    overrides.update(extra or {})
    return load_settings(args.config, overrides=overrides)


# -- subcommands ------------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import serve

    overrides = {
        "node.data_dir": str(args.data_dir) if args.data_dir else None,
        "node.ae_title": args.ae_title,
        "node.host": args.host,
        "node.port": args.port,
        "inference.weights": str(args.weights) if args.weights else None,
        "inference.device": args.device,
        "http.port": args.http_port,
        "queue.url": args.queue,
        "queue.node_id": args.node_id,
        "store.url": args.store,
        "node.roles": args.role,
        "node.receivers": args.receivers,
    }
    return serve(
        args.config, overrides, destinations=args.destination or [], allowed_calling_aes=args.allow_calling_ae or []
    )


def _associate(ae: Any, address: Any) -> tuple[Any, str | None]:
    """Associate; (association, None) when established, else (association, why not) — the peer's own reason when it
    rejected us (A-ASSOCIATE-RJ result, source and reason), or what went wrong on the way."""
    from pynetdicom import evt

    answers: list[Any] = []
    assoc = ae.associate(
        address.host,
        address.port,
        ae_title=address.ae_title,
        evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))],
    )
    if assoc.is_established:
        return assoc, None
    rejection = next((a for a in answers if getattr(a, "result", None) in (0x01, 0x02)), None)
    if rejection is not None:
        lasting = "permanent" if rejection.result == 0x01 else "transient: try again later"
        return assoc, f"association rejected by the {rejection.source_str.lower()} ({lasting}): {rejection.reason_str}"
    if assoc.is_aborted:
        return assoc, "association aborted by the peer"
    return assoc, (
        f"no association: nothing answered on {address.host}:{address.port} within {ae.acse_timeout:g} s "
        "(is the peer running, and is that its port?)"
    )


def _status_text(code: int | None) -> str:
    """A C-STORE status as its meaning: "Success", "Warning 0xB000 (Coercion of Data Elements)", ..."""
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

    if code is None:
        return "no response"
    if code == 0:
        return "Success"
    _, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code) or ("", "")
    return f"{code_to_category(code)} 0x{code:04X}{f' ({meaning})' if meaning else ''}"


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    address = parse_address(args.address)
    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    assoc, why = _associate(ae, address)
    if why:
        print(f"echo {address}: {why}", file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    milliseconds = (time.perf_counter() - started) * 1000
    if "Status" not in status or status.Status != 0:
        print(f"echo {address}: failed ({status.get('Status', 'no response')})", file=sys.stderr)
        return 1
    print(f"echo {address}: success in {milliseconds:.0f} ms")
    return 0


def _dicom_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def cmd_send(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    address = parse_address(args.address)
    datasets = []  # headers only: each file is read whole just before it is sent
    for path in _dicom_files(args.paths):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            datasets.append((path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except Exception as error:
            print(f"{path}: skipped, not a DICOM file ({error})", file=sys.stderr)
    if not datasets:
        print("nothing to send", file=sys.stderr)
        return 1
    contexts: dict[str, set[str]] = {}
    for _, sop_class, syntax in datasets:
        contexts.setdefault(sop_class, {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}).add(syntax)
    pairs = [(sop, syntax) for sop, syntaxes in sorted(contexts.items()) for syntax in sorted(syntaxes)]
    if len(pairs) > 128:
        print(f"{len(pairs)} presentation contexts needed, DICOM allows 128: send fewer kinds at once", file=sys.stderr)
        return 1
    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    assoc, why = _associate(ae, address)
    if why:
        print(f"send {address}: {why}", file=sys.stderr)
        return 1
    failures = 0
    started = time.perf_counter()
    try:
        for path, _, _ in datasets:
            status = assoc.send_c_store(dcmread(path))
            code = int(status.Status) if "Status" in status else None
            ok = code is not None and (code == 0 or code in (0xB000, 0xB006, 0xB007))
            failures += not ok
            comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
            print(f"{path}: {_status_text(code)}{comment}")
    finally:
        if assoc.is_established:
            assoc.release()
    seconds = time.perf_counter() - started
    print(f"sent {len(datasets) - failures} of {len(datasets)} in {seconds:.2f} s")
    return 1 if failures else 0


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file)
    print(describe(settings))
    print(f"{args.file}: OK")
    return 0


def _job_dict(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state.value,
        "sop_instance_uid": job.sop_instance_uid,
        "study_instance_uid": job.study_instance_uid,
        "sop_class_uid": job.sop_class_uid,
        "calling_ae": job.calling_ae,
        "peer_address": job.peer_address,
        "attempts": job.attempts,
        "claims": job.claims,
        "received_at": datetime.datetime.fromtimestamp(job.received_at).isoformat(timespec="seconds"),
        "received_at_unix": round(job.received_at, 3),
        "updated_at": datetime.datetime.fromtimestamp(job.updated_at).isoformat(timespec="seconds"),
        "delivered": list(job.delivered),
        "error": job.error,
        "results": [r.__dict__ for r in job.results],
        "timings": job.timings,
        "accession_number": job.accession_number,
        "study_date": job.study_date,
        "finding": job.finding,
        "model_version": job.model_version,
        "owner": job.owner,
        "lease_until": round(job.lease_until, 3) if job.lease_until else None,
    }


def _finding_text(finding: dict[str, Any] | None) -> str:
    if not finding:
        return "-"
    severity = finding.get("severity_percent", {})
    present = "opacity" if finding.get("opacity_present") else "none"
    return (
        f"{present} p={finding.get('opacity_probability', 0):.2f} "
        f"R {severity.get('right', 0):.0f}% L {severity.get('left', 0):.0f}%"
    )


def _timings_text(timings: dict[str, float]) -> str:
    stages = [("queue_wait", "wait"), ("inference", "infer"), ("writing", "write"), ("sending", "send")]
    return " ".join(f"{short} {timings[key]:.1f}" for key, short in stages if key in timings) or "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    from node.queue import JobState, open_queue

    settings = _settings(args)
    queue = open_queue(settings)
    try:
        state = JobState(args.state) if args.state else None
        jobs = queue.jobs(state, limit=args.limit)
        counts = queue.counts()
    finally:
        queue.close()
    total = counts[state] if state else sum(counts.values())
    if args.json:
        print(
            json.dumps(
                {
                    "counts": {k.value: v for k, v in counts.items()},
                    "total": total,
                    "jobs": [_job_dict(j) for j in jobs],
                },
                indent=2,
            )
        )
        return 0
    print("  ".join(f"{s.value}={n}" for s, n in counts.items()))
    header = (
        f"{'id':>6}  {'state':<9}  {'received':<19}  {'from':<16}  {'tries':>5}  {'finding':<26}  "
        f"{'to':<16}  {'seconds':<32}  SOP Instance UID"
    )
    print(header)
    for job in jobs:
        received = datetime.datetime.fromtimestamp(job.received_at).isoformat(sep=" ", timespec="seconds")
        if job.delivered:
            to = ",".join(job.delivered)
        elif job.state.value in ("received", "inferring", "writing", "sending", "dead"):
            to = ",".join(p.name for p in settings.destinations_for(job.calling_ae)) or "files"
        else:
            to = "files" if job.results else "-"
        print(
            f"{job.id:>6}  {job.state.value:<9}  {received:<19}  {job.calling_ae:<16}  {job.attempts:>5}  "
            f"{_finding_text(job.finding):<26}  {to:<16}  {_timings_text(job.timings):<32}  {job.sop_instance_uid}"
        )
        if job.error:
            print(f"{'':>6}  ! {job.error}")
    if len(jobs) < total:
        which = f"{state.value} " if state else ""
        print(f"showing the {len(jobs)} most recent of {total} {which}jobs; --limit N for more, --json for everything")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from node.audit import AuditLog
    from node.queue import open_queue

    if not args.jobs and not args.failed:
        print("resend: give job ids, or --failed for every dead or failed job", file=sys.stderr)
        return EXIT_USAGE
    settings = _settings(args)
    queue = open_queue(settings)
    try:
        unknown = [job_id for job_id in args.jobs if queue.get(job_id) is None]
        revived = queue.revive(None if args.failed else [j for j in args.jobs if j not in unknown])
    finally:
        queue.close()
    for job_id in unknown:
        print(f"job {job_id}: no such job (see `cxrnode jobs`)", file=sys.stderr)
    audit = AuditLog(settings.node.data_dir)
    audit.record(
        "admin", action="resend", requested=args.jobs or "--failed", jobs={job.id: job.state.value for job in revived}
    )
    for job in revived:
        print(f"job {job.id}: {job.state.value}")
    not_revived = sorted(set(args.jobs) - set(unknown) - {job.id for job in revived})
    for job_id in not_revived:
        print(f"job {job_id}: already on its way (received, inferring or writing); nothing to do")
    print(f"{len(revived)} job(s) queued again; a running node picks them up within a second")
    return 1 if unknown else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from models import Predictor
    from models.data.lungs import read_gray
    from node.orientation import IDENTITY, display_orientation, finding_to_stored, to_display
    from node.outputs import build_results, encode
    from node.overlay import render_overlay
    from node.pixels import prepare

    predictor = Predictor.load(args.weights, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for path in _dicom_files(args.files):
        try:
            note = None
            if path.suffix.lower() in (".png", ".jpg", ".jpeg"):  # a picture: taken as in the standard display
                source, pixels, transform = None, read_gray(path).astype("float32"), IDENTITY
            else:
                source = dcmread(path)
                pixels = prepare(source)
                orientation = display_orientation(source)
                transform, note = orientation.transform, orientation.note
            finding = finding_to_stored(predictor.predict([to_display(pixels, transform)])[0], transform)
        except Exception as error:
            print(f"{path}: {error}", file=sys.stderr)
            status = 1
            continue
        written = []
        if source is not None:
            for kind, ds in build_results(source, finding, args.objects, datetime.datetime.now(), pixels, note):
                target = args.out / f"{path.stem}.{kind.lower()}.dcm"
                target.write_bytes(encode(ds))
                written.append(str(target))
        if args.png:
            target = args.out / f"{path.stem}.overlay.png"
            render_overlay(pixels, finding).save(target)
            written.append(str(target))
        summary = {
            "file": str(path),
            "opacity_present": finding.opacity_present,
            "opacity_probability": round(finding.opacity_probability, 4),
            "boxes": [[round(v, 1) for v in o.box] + [round(o.score, 3)] for o in finding.opacities],
            "severity_percent": {
                "right": round(finding.severity.right, 2),
                "left": round(finding.severity.left, 2),
                "total": round(finding.severity.total, 2),
            },
            "extent_score": finding.extent.__dict__,
            "orientation_note": note,
            "written": written,
        }
        print(json.dumps(summary))
    return status


# -- the parser -------------------------------------------------------------------------------------------------------


# The ML commands' options come from their own modules (torchvision's get_args_parser + main), which import torch:
# only the command being run is imported, so that `cxrnode serve` keeps torch out of the receiving process.
ML_COMMANDS = {
    "synth": ("models.synth", "write a synthetic chest X-ray dataset in the RSNA layout"),
    "train": ("models.train", "train the opacity detector"),
    "train-lungs": ("models.train_lungs", "train the lung-field segmenter"),
    "evaluate": ("models.evaluate", "evaluate weights on a dataset"),
}


def build_parser(ml_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrnode", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, the DICOM libraries' (pynetdicom, highdicom) included",
    )
    parser.add_argument("--version", action="version", version=f"cxrnode {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the DICOM node")
    _config_arguments(serve)
    serve.add_argument("--ae-title", help="our AE title (default CXRNODE)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 11112)")
    serve.add_argument(
        "--destination",
        action="append",
        metavar="AE@HOST:PORT|URL",
        help="send results here (repeatable): by C-STORE, or by STOW-RS to a DICOMweb base URL (credentials from "
        "CXRNODE_DESTINATION_TOKEN, or CXRNODE_DESTINATION_USERNAME and _PASSWORD); replaces the default route",
    )
    serve.add_argument("--allow-calling-ae", nargs="+", metavar="AE", help="accept associations only from these AEs")
    serve.add_argument("--weights", type=Path, help="weights folder (default: the demo weights)")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    serve.add_argument("--http-port", type=int, help="metrics, health and status page port (0: none; default 11180)")
    serve.add_argument("--node-id", help="this node's name as the holder of queue jobs (default hostname:pid)")
    serve.add_argument(
        "--store",
        metavar="URL",
        help="images and results: file:///PATH (default the data dir) or the queue's postgresql://...",
    )
    serve.add_argument(
        "--role",
        metavar="ROLES",
        help="what this node runs: receive, infer, send, comma-separated (default all three; fewer need a shared "
        "--queue postgresql://...)",
    )
    serve.add_argument(
        "--receivers", type=int, metavar="N", help="receiving processes on the one DICOM port (default 1)"
    )
    serve.set_defaults(func=cmd_serve)

    echo = commands.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("address", metavar="AE@HOST:PORT")
    echo.add_argument("--calling-ae", default="CXRNODE", help="our AE title on this association (default CXRNODE)")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the peer (default 10)")
    echo.set_defaults(func=cmd_echo)

    send = commands.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    send.add_argument("address", metavar="AE@HOST:PORT")
    send.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    send.add_argument(
        "--calling-ae", default=SEND_CALLING_AE, help=f"our AE title on this association (default {SEND_CALLING_AE})"
    )
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the peer (default 30)")
    send.set_defaults(func=cmd_send)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)

    jobs = commands.add_parser("jobs", help="list the queue's jobs")
    _config_arguments(jobs)
    jobs.add_argument(
        "--state",
        choices=["received", "inferring", "writing", "sending", "done", "skipped", "failed", "dead"],
        help="only jobs in this state",
    )
    jobs.add_argument("--limit", type=int, default=50, help="show at most this many, most recent first (default 50)")
    jobs.add_argument(
        "--json", action="store_true", help="machine-readable: counts, and per job its results, finding and timings"
    )
    jobs.set_defaults(func=cmd_jobs)

    resend = commands.add_parser("resend", help="send jobs' results again (dead, failed, or done)")
    _config_arguments(resend)
    resend.add_argument(
        "jobs",
        type=int,
        nargs="*",
        metavar="JOB",
        help="job ids, queued again whatever their state: a done job's results are sent again to every destination",
    )
    resend.add_argument("--failed", action="store_true", help="every dead or failed job")
    resend.set_defaults(func=cmd_resend)

    predict = commands.add_parser("predict", help="analyse files offline; write SEG/SR (and --png overlays)")
    predict.add_argument("files", type=Path, nargs="+", metavar="FILE")
    predict.add_argument("--out", type=Path, required=True)
    predict.add_argument("--png", action="store_true", help="also write an overlay picture per image")
    predict.add_argument(
        "--objects",
        nargs="+",
        default=["SEG", "SR", "GSPS"],
        choices=["SEG", "SR", "GSPS", "SC"],
        help="result objects to write (default SEG SR GSPS)",
    )
    predict.add_argument("--weights", type=Path)
    predict.add_argument("--device", default="auto")
    predict.set_defaults(func=cmd_predict)

    for name, (module_name, text) in ML_COMMANDS.items():
        if name == ml_command:
            module = importlib.import_module(module_name)
            sub = commands.add_parser(name, help=text, parents=[module.get_args_parser(add_help=False)])
            sub.set_defaults(func=module.main)
        else:
            commands.add_parser(name, help=text, add_help=False)  # listed in --help; its options load when it runs
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")]
    parser = build_parser(ml_command=words[0] if words and words[0] in ML_COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command != "serve":
        _quiet_logging(args.verbose, progress=args.command in ML_COMMANDS)
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:
        print(f"configuration error:\n{error}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, ModelsError, StartupError) as error:
        print(f"cxrnode {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `cxrnode jobs | head`: the reader has gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    except KeyboardInterrupt:
        return 130


def _quiet_logging(verbose: bool, progress: bool) -> None:
    """The tools print what they have to say; logging carries only warnings (and, for the ML commands, the models'
    progress). With -v, everything, the libraries' debug output included."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not verbose and progress:
        logging.getLogger("models").setLevel(logging.INFO)  # training and evaluation progress
    if not verbose:
        # pynetdicom logs a rejection or abort as errors of its own; the tools print the reason themselves.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def _version() -> str:
    try:
        return importlib.metadata.version("cxrnode")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    raise SystemExit(main())
