"""The `sdbatch` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sdbatch", description="Stable Diffusion img2img over datasets, on Ray"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the core on generated images with a tiny model it makes")
    demo.add_argument("--output", default="demo-output", help="folder to write into")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from jobs.demo import main as demo_main

        demo_main(["--output", args.output])


if __name__ == "__main__":
    main()
