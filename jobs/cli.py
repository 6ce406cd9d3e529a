"""The `sdbatch` command: `sdbatch run ...` (the img2img job), `sdbatch augment ...`, `sdbatch verify ...`
and `sdbatch demo`."""

from __future__ import annotations

import sys

COMMANDS = {
    "run": "run the img2img job (same flags as `python -m jobs.img2img`; --help for them)",
    "augment": "dataset augmentation: the job with the config's augment policy (--partition; --help)",
    "verify": "check an output's accounting: every input row once in metadata or errors (--help)",
    "demo": "run the job on generated images with a tiny model it makes (what `make demo` does)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:7} {text}" for name, text in COMMANDS.items())
        print(f"usage: sdbatch {{{','.join(COMMANDS)}}} ...\n\n{usage}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from jobs.img2img import main as run_main

        return run_main(rest, prog="sdbatch run")
    if command == "augment":
        from jobs.augment import main as augment_main

        return augment_main(rest, prog="sdbatch augment")
    if command == "verify":
        from jobs.verify import main as verify_main

        return verify_main(rest)
    from jobs.demo import main as demo_main

    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
