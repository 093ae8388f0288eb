"""The `cxrnode` command: parses its arguments, then calls one function per subcommand.

cxrnode serve            run the node (Storage SCP → queue → inference → SEG/SR → C-STORE)
cxrnode echo / send      C-ECHO / C-STORE to any DICOM peer
cxrnode config check     validate a configuration file
cxrnode jobs / resend    look at the queue; send dead jobs again
cxrnode predict          offline: the same SEG/SR the node would send, and an overlay picture
cxrnode synth / train / train-lungs / evaluate   the models' tools (models/)
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.errors import ModelsError
from node.config import ConfigError, Settings, describe, load_settings, parse_address

log = logging.getLogger(__name__)

EXIT_USAGE = 2


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML configuration file (default: $CXRNODE_CONFIG or built-in defaults)"
    )
    parser.add_argument("--data-dir", type=Path, help="where the spool, queue and results live")


def _settings(args: argparse.Namespace, extra: dict[str, object] | None = None) -> Settings:
    overrides: dict[str, object] = {"node.data_dir": str(args.data_dir) if args.data_dir else None}
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
    }
    return serve(
        args.config, overrides, destinations=args.destination or [], allowed_calling_aes=args.allow_calling_ae or []
    )


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    address = parse_address(args.address)
    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    assoc = ae.associate(address.host, address.port, ae_title=address.ae_title)
    if not assoc.is_established:
        print(f"echo {address}: association {'rejected' if assoc.is_rejected else 'failed'}", file=sys.stderr)
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
    assoc = ae.associate(address.host, address.port, ae_title=address.ae_title)
    if not assoc.is_established:
        print(f"send {address}: association {'rejected' if assoc.is_rejected else 'failed'}", file=sys.stderr)
        return 1
    failures = 0
    started = time.perf_counter()
    try:
        for path, _, _ in datasets:
            status = assoc.send_c_store(dcmread(path))
            code = int(status.Status) if "Status" in status else None
            ok = code is not None and (code == 0 or code in (0xB000, 0xB006, 0xB007))
            failures += not ok
            text = f"0x{code:04X}" if code is not None else "no response"
            comment = f" {status.ErrorComment}" if "ErrorComment" in status else ""
            print(f"{path}: {text}{comment}")
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
    }


def cmd_jobs(args: argparse.Namespace) -> int:
    from node.queue import JobState
    from node.service import open_queue

    settings = _settings(args)
    queue = open_queue(settings)
    try:
        jobs = queue.jobs(JobState(args.state) if args.state else None, limit=args.limit)
        counts = queue.counts()
    finally:
        queue.close()
    if args.json:
        print(
            json.dumps(
                {"counts": {k.value: v for k, v in counts.items()}, "jobs": [_job_dict(j) for j in jobs]}, indent=2
            )
        )
        return 0
    print("  ".join(f"{state.value}={n}" for state, n in counts.items()))
    print(f"{'id':>6}  {'state':<9}  {'received':<19}  {'calling AE':<16}  {'tries':>5}  SOP Instance UID / error")
    for job in jobs:
        received = datetime.datetime.fromtimestamp(job.received_at).isoformat(sep=" ", timespec="seconds")
        print(
            f"{job.id:>6}  {job.state.value:<9}  {received:<19}  {job.calling_ae:<16}  {job.attempts:>5}  "
            f"{job.sop_instance_uid}"
        )
        if job.error:
            print(f"{'':>6}  {'':<9}  {'':<19}  {'':<16}  {'':>5}  ! {job.error}")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from node.audit import AuditLog
    from node.service import open_queue

    if not args.jobs and not args.failed:
        print("resend: give job ids, or --failed for every dead or failed job", file=sys.stderr)
        return EXIT_USAGE
    settings = _settings(args)
    queue = open_queue(settings)
    try:
        revived = queue.revive(None if args.failed else args.jobs)
    finally:
        queue.close()
    audit = AuditLog(settings.node.data_dir)
    audit.record(
        "admin", action="resend", requested=args.jobs or "--failed", jobs={job.id: job.state.value for job in revived}
    )
    for job in revived:
        log.info("resend: job=%d sop=%s back to %s", job.id, job.sop_instance_uid, job.state.value)
        print(f"job {job.id}: {job.state.value}")
    print(f"{len(revived)} job(s) queued again; a running node picks them up within a second")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from models import Predictor
    from models.data.lungs import read_gray
    from node.outputs import build_results, encode
    from node.overlay import render_overlay
    from node.pixels import prepare

    predictor = Predictor.load(args.weights, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for path in _dicom_files(args.files):
        try:
            if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
                source, pixels = None, read_gray(path).astype("float32")
            else:
                source = dcmread(path)
                pixels = prepare(source)
            finding = predictor.predict([pixels])[0]
        except Exception as error:
            print(f"{path}: {error}", file=sys.stderr)
            status = 1
            continue
        written = []
        if source is not None:
            for kind, ds in build_results(source, finding, args.objects, datetime.datetime.now(), pixels):
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
        prog="cxrnode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    serve.set_defaults(func=cmd_serve)

    echo = commands.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("address", metavar="AE@HOST:PORT")
    echo.add_argument("--calling-ae", default="CXRNODE")
    echo.add_argument("--timeout", type=float, default=10.0)
    echo.set_defaults(func=cmd_echo)

    send = commands.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    send.add_argument("address", metavar="AE@HOST:PORT")
    send.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    send.add_argument("--calling-ae", default="CXRNODE")
    send.add_argument("--timeout", type=float, default=30.0)
    send.set_defaults(func=cmd_send)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)

    jobs = commands.add_parser("jobs", help="list the queue's jobs")
    _config_arguments(jobs)
    jobs.add_argument(
        "--state", choices=["received", "inferring", "writing", "sending", "done", "skipped", "failed", "dead"]
    )
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=cmd_jobs)

    resend = commands.add_parser("resend", help="send jobs' results again (dead, failed, or done)")
    _config_arguments(resend)
    resend.add_argument("jobs", type=int, nargs="*", metavar="JOB")
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
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:
        print(f"configuration error:\n{error}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, ModelsError) as error:
        print(f"cxrnode {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
