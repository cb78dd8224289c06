"""infer.py: chat with a tuned agent, run it against real tools, predict over an eval file,
or serve it behind an OpenAI-compatible API.

Not built yet: those modes arrive with the inference issue. Today this script only shows the
exact prompt text a conversation renders to with a training template, so you can check what
the model will see at inference:

    python infer.py FILE [--template qwen] [--index 0]
"""

import argparse
import sys

from agenttune.data.readers import read_file
from agenttune.data.schema import DataError
from agenttune.data.templates import TEMPLATES, get_template


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a data file in any supported format")
    p.add_argument("--template", default="qwen", choices=sorted(TEMPLATES))
    p.add_argument("--index", type=int, default=0)
    args = p.parse_args(argv)
    items = list(read_file(args.file))
    if not 0 <= args.index < len(items):
        print(f"error: {args.file} has {len(items)} records; --index {args.index} is out of range", file=sys.stderr)
        return 2
    item = items[args.index]
    if isinstance(item, DataError):
        print(f"error: {item}", file=sys.stderr)
        return 1
    # The prompt is everything before the last assistant turn, plus the generation header.
    last = max(i for i, m in enumerate(item.messages) if m.role == "assistant")
    item.messages = item.messages[:last]
    segments = get_template(args.template).render(item, add_generation_prompt=True)
    print("".join(s.text for s in segments), end="")
    print("\n[infer.py] generation modes (chat, agent, predict, serve) are not implemented yet.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
