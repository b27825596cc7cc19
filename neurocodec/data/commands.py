"""`neurocodec data scan|debian|espeak`: build manifests from folders of audio, the Debian speech corpus and
espeak-ng."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build audio manifests: any folder (scan), the Debian speech corpus (debian), "
                                    "synthetic speech (espeak)")
    data = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    s = data.add_parser("scan", help="folder of audio (recursive) -> manifest.jsonl")
    s.add_argument("dir", help="folder to scan; LibriSpeech/LibriTTS layouts give speakers and transcripts")
    s.add_argument("-o", "--output", required=True, help="manifest to write (.jsonl; paths relative to it)")
    s.add_argument("--split", default=None, help="put this split (train/valid/test) on every line")
    s.add_argument("--language", default=None, help="put this language code on every line")
    s.set_defaults(func=cmd_scan)

    d = data.add_parser("debian", help="real speech from Debian's asterisk-core-sounds-*-g722 -> FLAC + manifests")
    d.add_argument("-o", "--output", required=True, help="folder for audio/, music/ and the .jsonl manifests")
    d.add_argument("--languages", default="en,es,fr,it,ru", help="voices to include (default: all five)")
    d.add_argument("--test-language", default="fr",
                   help="voice held out as split 'test' (default: fr, June Wallack -- a speaker no other voice has); "
                        "'none': no test voice (a training-only corpus, as the GPU kit builds)")
    d.add_argument("--more-voices", action="store_true",
                   help="add the other real voices of Debian's packages (Czech game dialogue, Mandarin syllables, "
                        "KLettres letters; ~2.9 h) and hold out two more speakers: fillets_cs_m and gcin_3")
    d.add_argument("--no-install", action="store_true", help="never call apt-get; use the files already there")
    d.add_argument("--no-music", action="store_true", help="skip the music-on-hold set (music.jsonl)")
    d.add_argument("--sounds-dir", default="/usr/share/asterisk/sounds", help="where the voice folders are")
    d.add_argument("--moh-dir", default="/usr/share/asterisk/moh", help="where the music-on-hold .g722 files are")
    d.add_argument("--demo", default=None, metavar="DIR",
                   help="also pick the small demo corpus into DIR (how data/demo is built)")
    d.add_argument("--demo-seconds", type=float, default=60.0, help="seconds of speech per voice in the demo")
    d.add_argument("--demo-valid-seconds", type=float, default=10.0,
                   help="seconds per training voice that go to 'valid' in the demo")
    d.set_defaults(func=cmd_debian)

    e = data.add_parser("espeak", help="synthetic espeak-ng speech of a manifest's training transcripts, "
                                       "as a second manifest (the source's lines + the synthetic ones)")
    e.add_argument("manifest", help="source manifest (e.g. a `data debian --more-voices` corpus's manifest.jsonl)")
    e.add_argument("-o", "--output", required=True,
                   help="folder for audio/espeak/, espeak.jsonl and manifest.jsonl (train on this one)")
    e.add_argument("--minutes", type=float, default=20.0,
                   help="synthetic minutes in all, spread evenly over languages x variants; each voice gets at "
                        "least one utterance (default 20)")
    e.add_argument("--variants", default=None,
                   help="comma-separated espeak-ng voice variants, each a speaker per language (default: "
                        "data/espeak.py's DEFAULT_VARIANTS, three low-pitched, two high-pitched, two Klatt)")
    e.add_argument("--no-install", action="store_true", help="never call apt-get to install espeak-ng")
    e.set_defaults(func=cmd_espeak)


def cmd_scan(args: argparse.Namespace) -> int:
    from .manifest import write_manifest
    from .scan import scan_dir

    result = scan_dir(args.dir, progress=True)
    for u in result.utterances:
        u.split = args.split or u.split
        u.language = args.language or u.language
    if not result.utterances:
        raise UserError(f"no readable audio under {args.dir} ({len(result.unreadable)} unreadable files)")
    write_manifest(args.output, result.utterances)
    speakers = {u.speaker for u in result.utterances if u.speaker}
    with_text = sum(1 for u in result.utterances if u.text)
    print(f"{args.output}: {len(result.utterances)} files, {result.hours:.3f} h, {len(speakers)} speakers, "
          f"{with_text} with a transcript; unreadable: {len(result.unreadable)}")
    for path, reason in result.unreadable[:20]:
        print(f"  unreadable: {path}: {reason}", file=sys.stderr)
    if len(result.unreadable) > 20:
        print(f"  ... and {len(result.unreadable) - 20} more unreadable files", file=sys.stderr)
    return 0


def cmd_espeak(args: argparse.Namespace) -> int:
    from . import debian, espeak

    if not args.no_install and shutil.which("espeak-ng") is None:
        debian.ensure_packages([espeak.PACKAGE], alternative="--no-install with espeak-ng on the PATH")
    variants = (tuple(v.strip() for v in args.variants.split(",") if v.strip()) if args.variants is not None
                else espeak.DEFAULT_VARIANTS)
    summary = espeak.build_espeak_corpus(args.manifest, args.output, args.minutes, variants=variants)
    out = Path(args.output)
    for speaker, seconds in summary["speakers"].items():
        print(f"{speaker:28s} {seconds / 60:6.2f} min")
    print(f"espeak-ng: {summary['files']} files, {summary['minutes']:.2f} min in {len(summary['speakers'])} "
          f"voices; failed: {len(summary['failed'])}")
    for what, reason in summary["failed"][:10]:
        print(f"  failed: {what}: {reason}", file=sys.stderr)
    print(f"wrote {out / 'espeak.jsonl'} and {out / 'manifest.jsonl'} ({summary['source_lines']} source lines "
          f"+ {summary['files']} synthetic; train with --data.manifest {out / 'manifest.jsonl'})")
    return 0


def cmd_debian(args: argparse.Namespace) -> int:
    from . import debian

    languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    test_language = None if args.test_language.lower() == "none" else args.test_language
    summary = debian.build_corpus(args.output, languages=languages, test_language=test_language,
                                  sounds_dir=args.sounds_dir, moh_dir=args.moh_dir, install=not args.no_install,
                                  music=not args.no_music, more_voices=args.more_voices)
    out = Path(args.output)
    print(debian.format_summary(summary))
    print(f"wrote {out / 'manifest.jsonl'} (+ train/valid/test.jsonl{', music.jsonl' if not args.no_music else ''})")
    if args.demo:
        demo = debian.build_demo(out / "manifest.jsonl", args.demo, seconds_per_voice=args.demo_seconds,
                                 valid_seconds_per_voice=args.demo_valid_seconds)
        print(f"demo corpus {args.demo}: {sum(demo['files'][g] for g in demo['files'] if g.startswith('split'))} "
              f"files, {demo['total_hours'] * 60:.2f} min, {demo['bytes'] / 1e6:.2f} MB")
        print(debian.format_summary(demo))
    return 0
