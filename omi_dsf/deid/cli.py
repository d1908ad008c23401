"""De-identify (PS3.15 E.1-1) and pseudonymize a DICOM study, or re-identify returned results.

`python -m omi_dsf deid IN_DIR OUT_DIR --domain D --key-file F [--option NAME ...]`

De-identifies every DICOM file under IN_DIR into OUT_DIR (one file per SOP instance, IN_DIR is
never written), or with --reidentify maps returned results in IN_DIR back to the originals.
Prints one JSON summary line; exits 2 on bad input with a message naming the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .profile import OPTION_NAMES
from .refusal import POLICIES, Refused


def register(subparsers) -> None:
    p = subparsers.add_parser("deid", help="de-identify / pseudonymize a DICOM study (PS3.15 E.1-1)",
                              description=__doc__.splitlines()[0])
    p.add_argument("in_dir", type=Path, help="folder with the study's DICOM files")
    p.add_argument("out_dir", type=Path, help="folder for the results (created)")
    p.add_argument("--domain", required=True, help="pseudonym domain")
    p.add_argument("--key-file", help="site key file (else $OMI_DEID_KEY_FILE / $OMI_DEID_KEY)")
    p.add_argument("--option", action="append", default=[], choices=sorted(OPTION_NAMES),
                   help="profile option; repeat for several")
    p.add_argument("--store", default="omi-site.sqlite",
                   help="site store (UID map, removed attributes); keep it at the site")
    p.add_argument("--provider", choices=("embedded", "gpas", "ttp-fhir"), default="embedded")
    p.add_argument("--provider-url", help="gPAS WSDL URL or TTP-FHIR gPAS base URL")
    p.add_argument("--on-refused-instance", choices=POLICIES, default="refuse-study",
                   help="an instance that cannot be de-identified safely: stop (default) or leave it"
                        " out, write the rest and name each refused one on stderr and in the summary")
    p.add_argument("--pixel-recipes", action="append", default=[], type=Path, metavar="FILE",
                   help="extra pixel-cleaning recipe file (besides the shipped one); repeat for several")
    p.add_argument("--reidentify", action="store_true", help="map returned results back")
    p.set_defaults(func=run)


def run(args) -> int:
    from omi_dsf.errors import UserError

    from omi_dsf.config import parse

    from .config import PseudonymProviderSettings
    from .instance_io import FolderSink, FolderSource
    from .keys import KeyError_, load_key
    from .pipeline import DeidError, StudyPseudonymizer, read_instance
    from .pseudonyms import PseudonymError, make_provider
    from .reidentify import Reidentifier, ReidentifyError
    from .store import SiteStore

    if args.in_dir.resolve() == args.out_dir.resolve():
        raise UserError("OUT_DIR must differ from IN_DIR: the input is never modified")
    try:
        key = load_key(args.key_file)
        source = FolderSource(args.in_dir)
    except (KeyError_, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    store = SiteStore(args.store)
    sink = FolderSink(args.out_dir)
    try:
        config = {"kind": args.provider}
        if args.provider != "embedded":
            if not args.provider_url:
                raise UserError(f"--provider {args.provider} needs --provider-url")
            config["wsdl" if args.provider == "gpas" else "url"] = args.provider_url
        provider = make_provider(parse(PseudonymProviderSettings, config, where="--provider-url"), key, store)
        if args.reidentify:
            re_id = Reidentifier(store, provider, args.domain)
            count = 0
            for name, path in source:
                sink.write(re_id.reidentify(read_instance(path, name)))
                count += 1
            summary = {"reidentified": count, "out": sink.close()}
        else:
            run_ = StudyPseudonymizer(key=key, domain=args.domain, provider=provider, store=store,
                                      options=args.option, policy=args.on_refused_instance,
                                      pixel_recipes=args.pixel_recipes)
            for out in run_.process(source):
                store.flush()       # the instance's UID map at the site before its file is written
                sink.write(out.dataset, out.data)
            store.sync()
            r = run_.result
            refused = [str(x) for x in r.refused]
            for line in refused:
                print(f"refused {line}", file=sys.stderr)
            if refused and not r.instances:
                raise DeidError(f"no instance could be written: {len(refused)} refused")
            summary = {"instances": r.instances, "refused": len(refused), "pseudonym": r.pseudonym,
                       "pseudonymized_study_uids": sorted(r.study_uids.values()), "out": sink.close(),
                       "refused_instances": refused}
    except (Refused, ReidentifyError, PseudonymError, ValueError) as exc:
        sink.abort()
        raise UserError(str(exc)) from None
    finally:
        store.close()
    print(json.dumps(summary), file=sys.stdout)
    return 0
