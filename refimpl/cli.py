"""The `refimpl` command line: pull, convert-gguf, generate."""

import argparse
import sys

from refimpl.pull import DEFAULT_MODEL


def main(argv=None):
    parser = argparse.ArgumentParser(prog="refimpl", description="Reference LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch and convert the default model into the cache (once)")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)

    p = sub.add_parser("convert-gguf", help="convert a GGUF file into an HF-layout directory")
    p.add_argument("gguf_file")
    p.add_argument("out_dir")

    p = sub.add_parser("generate", help="print the greedy continuation of a prompt")
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model directory or a known model name")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    args = parser.parse_args(argv)
    return {"pull": cmd_pull, "convert-gguf": cmd_convert, "generate": cmd_generate}[args.command](args)


def cmd_pull(args):
    from refimpl.pull import pull

    print(pull(args.name))
    return 0


def cmd_convert(args):
    from refimpl.gguf_import import convert_gguf

    convert_gguf(args.gguf_file, args.out_dir)
    print(args.out_dir)
    return 0


def cmd_generate(args):
    from refimpl.generate import greedy
    from refimpl.model import load_model
    from refimpl.pull import resolve_model
    from refimpl.tokenizer import Tokenizer

    path = resolve_model(args.model)
    model, tokenizer = load_model(path, args.device), Tokenizer.from_dir(path)
    if args.chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    stop_ids = {tokenizer.eos_token_id} - {None}
    out, shown = [], ""
    for token in greedy(model, ids, args.max_tokens, stop_ids):
        if token in stop_ids:
            break
        out.append(token)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(out)[len(shown):] + "\n")
    return 0
