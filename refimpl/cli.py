"""The `refimpl` command line: pull, convert-gguf, generate, score, compare, tokenize, inspect, chat
(and serve, from webapp)."""

import argparse
import json
import os
import sys

from refimpl.pull import DEFAULT_MODEL


def main(argv=None):
    parser = argparse.ArgumentParser(prog="refimpl", description="Reference LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch and convert the default model into the cache (once)")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(run=cmd_pull)

    p = sub.add_parser("convert-gguf", help="convert a GGUF file into an HF-layout directory")
    p.add_argument("gguf_file")
    p.add_argument("out_dir")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("generate", help="print a continuation of a prompt (greedy unless told otherwise)")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    add_model_options(p)
    add_sampling_options(p, temperature=0.0, max_tokens=64)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("score", help="print the log-probability of every token of a text given its prefix")
    p.add_argument("text", nargs="?", help="the text to score (raw, no special tokens added)")
    p.add_argument("--chat", metavar="FILE.json", help="score a conversation (a JSON list of messages) as the template renders it")
    p.add_argument("--top", type=int, default=0, help="also print the N most likely tokens at each position")
    p.add_argument("--input", metavar="IN.jsonl", help='score a data set: one {"id", "text" | "token_ids" | "messages"} '
                                                      "a line (see refimpl/scoring.py); needs --output")
    p.add_argument("--output", metavar="OUT.jsonl", help="where --input's scores go, a line per input line, in order; "
                                                        "ids already there are skipped (resuming)")
    p.add_argument("--ray", metavar="ADDRESS", help="spread --input over Ray workers: 'local' (Ray in this "
                                                  "process), 'auto' or HOST:PORT (a cluster from `ray start`); "
                                                  "needs pip install -e '.[ray]'")
    p.add_argument("--workers", type=int, help="Ray workers, each loading the model once (default: one per CPU)")
    add_model_options(p)
    p.set_defaults(run=cmd_score)

    p = sub.add_parser("compare", help="check another OpenAI-compatible server's log-probabilities against "
                                       "refimpl's float32 forward pass (exit 0 agree, 1 differ, 2 could not compare)")
    p.add_argument("--server", required=True, metavar="URL", help="the server's base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--server-model", metavar="NAME", help="the model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or None, help="sent as a bearer token")
    p.add_argument("--prompts", metavar="FILE.jsonl", help='one {"prompt": text | [ids]} or {"messages": [...]} a '
                                                           "line, with optional sampling fields (default: a built-in set)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens the server generates per prompt (default 32)")
    p.add_argument("--top", type=int, default=5, help="top log-probabilities asked for at each position (default 5)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest |Δ logprob| that agrees (default 1e-3)")
    p.add_argument("--no-echo", dest="echo", action="store_false",
                   help="compare the generated tokens only, not the prompt's log-probabilities (echo)")
    p.add_argument("--json", metavar="OUT.json", help="write the whole report there")
    add_model_options(p)
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("tokenize", help="show how a text is cut into tokens: ids, pieces and bytes")
    p.add_argument("text")
    p.add_argument("--chat", action="store_true", help="render the text as a user message with the chat template first")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model directory or a known model name")
    p.set_defaults(run=cmd_tokenize)

    p = sub.add_parser("inspect", help="look inside the model: each token's log-probability, the logit lens "
                                       "(--lens), attention weights (--attention L:H)")
    p.add_argument("text")
    p.add_argument("--chat", action="store_true", help="render the text as a user message with the chat template "
                                                       "(and the assistant's header) first")
    p.add_argument("--lens", action="store_true", help="what each layer would predict, layer by layer")
    p.add_argument("--top", type=int, default=3, help="--lens candidates per layer (default 3)")
    p.add_argument("--attention", action="append", default=[], metavar="L:H",
                   help="the weights of head H of layer L over the earlier tokens (repeatable)")
    p.add_argument("--at", type=int, action="append", metavar="POSITION",
                   help="the position --lens and --attention look at (repeatable; negative counts from the end; "
                        "default -1, the last, which predicts what comes next)")
    add_model_options(p)
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("chat", help="chat with the model in the terminal (/new starts over, Ctrl-D quits)")
    p.add_argument("--system", help="a system prompt")
    add_model_options(p)
    add_sampling_options(p, temperature=0.7, max_tokens=512)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (http://HOST:PORT/v1, docs at /docs)")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("REFIMPL_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $REFIMPL_API_KEY; none: open)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin, or * for any (repeatable; default: no CORS headers)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--max-seqs", type=int, default=16,
                   help="sequences decoded together in one batch, at most (a request's n must fit)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for the batch; beyond: 429")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections, idle ones and WebSockets included (default 1000)")
    p.add_argument("--read-timeout", type=float, default=30,
                   help="seconds a client may stay silent while sending a body or reading a reply (default 30)")
    p.add_argument("--ws-idle-timeout", type=float, default=600,
                   help="seconds an idle WebSocket is kept open (default 600)")
    p.add_argument("--ws-ping-interval", type=float, default=20,
                   help="seconds between pings on a WebSocket, which is closed if a ping goes unanswered (default 20)")
    p.add_argument("--dev", action="store_true", help="Flask's development server instead of gunicorn")
    p.set_defaults(run=cmd_serve)

    args = parser.parse_args(argv)
    return args.run(args)


def add_model_options(p):
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model directory or a known model name")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def add_sampling_options(p, temperature, max_tokens):
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def sampling_params(args):
    from refimpl.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.max_tokens,
                          stop=args.stop)


def load(args):
    """The model, its tokenizer and its end-of-sequence ids, from --model and --device."""
    from refimpl.generate import load
    from refimpl.pull import resolve_model

    return load(resolve_model(args.model), args.device)


def stream(model, tokenizer, stop_ids, ids, params):
    """Generate one choice, writing text to stdout as it comes; return the whole text."""
    from refimpl.generate import generate

    text = []
    for event in generate(model, tokenizer, ids, params, stop_ids):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        text.append(event.text)
    return "".join(text)


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
    model, tokenizer, stop_ids = load(args)
    messages = [{"role": "user", "content": args.prompt}]
    ids = tokenizer.encode_chat(messages) if args.chat else tokenizer.encode(args.prompt)
    stream(model, tokenizer, stop_ids, ids, sampling_params(args))
    print()
    return 0


def cmd_score(args):
    from refimpl.generate import prompt_logprobs

    if (args.input is None) != (args.output is None):
        print("refimpl score: --input and --output go together", file=sys.stderr)
        return 2
    if args.ray and not args.input:
        print("refimpl score: --ray scores a data set: give --input and --output", file=sys.stderr)
        return 2
    if args.ray:
        from refimpl.scoring_ray import RayScoringError, score_file_on_ray

        try:
            scored, skipped, bad = score_file_on_ray(args.ray, args.model, args.input, args.output, args.top,
                                                     args.workers, args.device,
                                                     report=lambda line: print(line, file=sys.stderr))
        except RayScoringError as error:
            print(f"refimpl score: {error}", file=sys.stderr)
            return 2
        print(f"refimpl score: {scored} scored, {skipped} already in {args.output}, {bad} bad lines", file=sys.stderr)
        return 1 if bad else 0
    model, tokenizer, _ = load(args)
    if args.input:
        from refimpl.scoring import score_file

        scored, skipped, bad = score_file(model, tokenizer, args.input, args.output, args.top,
                                          report=lambda line: print(line, file=sys.stderr))
        print(f"refimpl score: {scored} scored, {skipped} already in {args.output}, {bad} bad lines", file=sys.stderr)
        return 1 if bad else 0
    if args.chat:
        with open(args.chat, encoding="utf-8") as f:
            ids = tokenizer.encode_chat(json.load(f), add_generation_prompt=False)
    elif args.text is not None:
        ids = tokenizer.encode(args.text)
    else:
        print("refimpl score: give TEXT or --chat FILE.json", file=sys.stderr)
        return 2
    entries = prompt_logprobs(model, tokenizer, ids, args.top)
    print(f"{'pos':>5} {'token id':>8}  {'logprob':>10}  token")
    for pos, (token_id, entry) in enumerate(zip(ids, entries)):
        logprob = "" if entry is None else f"{entry.logprob:10.4f}"
        alternatives = "" if entry is None else "  ".join(f"{t.token!r}:{t.logprob:.3f}" for t in entry.top)
        print(f"{pos:5d} {token_id:8d}  {logprob:>10}  {tokenizer.decode([token_id])!r}  {alternatives}".rstrip())
    total = sum(e.logprob for e in entries[1:])
    print(f"total log-probability of tokens 1..{len(ids) - 1}: {total:.4f}")
    return 0


def cmd_compare(args):
    from refimpl.compare import BUILTIN_PROMPTS, CannotCompare, Server, compare, describe, read_prompts

    def log(line):
        print(line, file=sys.stderr)

    try:
        specs = read_prompts(args.prompts) if args.prompts else BUILTIN_PROMPTS
        server = Server(args.server, args.api_key, args.server_model)
        model, tokenizer, _ = load(args)
        report = compare(model, tokenizer, server, specs, args.top, args.max_tokens, args.tolerance, args.echo, log)
    except CannotCompare as error:
        print(f"refimpl compare: cannot compare: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
    print(describe(report))
    return 0 if report["verdict"] == "agree" else 1


def cmd_tokenize(args):
    from refimpl.explain import token_label
    from refimpl.pull import resolve_model
    from refimpl.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(resolve_model(args.model))
    ids = prompt_ids(tokenizer, args.text, args.chat)
    if args.chat:
        print(tokenizer.decode(ids))
    print(f"{'pos':>5} {'id':>7}  {'piece':<24} bytes")
    for pos, token_id in enumerate(ids):
        text, raw, special = token_label(tokenizer, token_id)
        print(f"{pos:5d} {token_id:7d}  {text!r:<24} {'(special)' if special else bytes(raw).hex(' ')}")
    print(f"{len(ids)} tokens, {len(args.text.encode())} bytes of text")
    return 0


def prompt_ids(tokenizer, text, chat):
    """The text's ids; with `chat`, as a user message of the chat template, ready for the reply."""
    return tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)


def cmd_inspect(args):
    from refimpl import inspection
    from refimpl.explain import token_text

    model, tokenizer, _ = load(args)
    ids = prompt_ids(tokenizer, args.text, args.chat)
    pairs = []
    for spec in args.attention:
        layer, _, head = spec.partition(":")
        if not (layer.isdigit() and head.isdigit()):
            print(f"refimpl inspect: --attention takes LAYER:HEAD, e.g. 3:0, not {spec!r}", file=sys.stderr)
            return 2
        pairs.append((int(layer), int(head)))
    at = [p + len(ids) if p < 0 else p for p in (args.at or [-1])]
    try:
        asked = inspection.request(model.config, len(ids), at, args.top if args.lens else None,
                                   sorted({layer for layer, _ in pairs}) or None, sorted({h for _, h in pairs}) or None)
    except inspection.InspectionError as error:
        print(f"refimpl inspect: {error}", file=sys.stderr)
        return 2
    result = inspection.inspect(model, ids, asked)

    def show(token_id):
        return repr(token_text(tokenizer, token_id)[0])

    print(f"{'pos':>5} {'id':>7} {'logprob':>9}  token")
    for pos, (token_id, logprob) in enumerate(zip(ids, result.logprobs)):
        print(f"{pos:5d} {token_id:7d} {'' if logprob is None else f'{logprob:9.4f}':>9}  {show(token_id)}")
    for i, pos in enumerate(result.positions):
        following = f"next {show(ids[pos + 1])}" if pos + 1 < len(ids) else "the end of the prompt"
        if result.lens is not None:
            print(f"\nlogit lens at position {pos} ({show(ids[pos])}, {following}): layer 0 is the embeddings, "
                  f"layer {model.config.num_hidden_layers} the model's output")
            print(f"{'layer':>5} {'entropy':>8} {'next rank':>9} {'next logprob':>12}  top {args.top}")
            for layer, row in enumerate(result.lens[i]):
                rank = "" if row.next_rank is None else str(row.next_rank)
                logprob = "" if row.next_logprob is None else f"{row.next_logprob:.4f}"
                top = "  ".join(f"{show(t)} {lp:.2f}" for t, lp in row.top)
                print(f"{layer:5d} {row.entropy:8.3f} {rank:>9} {logprob:>12}  {top}")
        for layer, head in pairs:
            weights = result.attention[(layer, head)][i]
            print(f"\nattention of layer {layer}, head {head}, at position {pos} ({show(ids[pos])}) over positions 0..{pos}:")
            for key, w in enumerate(weights):
                print(f"{key:5d} {show(ids[key]):<20} {w:7.4f} {'#' * round(w * 40)}")
    return 0


def cmd_serve(args):
    """The one place refimpl and webapp meet: resolve (fetch) the model here, serve it from webapp."""
    from pathlib import Path

    from refimpl.pull import KNOWN_MODELS, resolve_model
    from webapp.server import serve

    if args.api_key == "":
        print("refimpl serve: --api-key must not be empty (leave it out for an open server)", file=sys.stderr)
        return 2
    path = resolve_model(args.model)
    model_id = args.model if args.model in KNOWN_MODELS else Path(path).resolve().name
    return serve(path, model_id, host=args.host, port=args.port, device=args.device, dev=args.dev,
                 max_seqs=args.max_seqs, max_queue=args.max_queue, max_connections=args.max_connections,
                 api_key=args.api_key, cors_origins=tuple(args.cors_origin), max_body_bytes=args.max_body_bytes,
                 read_timeout_s=args.read_timeout, ws_idle_s=args.ws_idle_timeout, ws_ping_s=args.ws_ping_interval)


def cmd_chat(args):
    model, tokenizer, stop_ids = load(args)
    params = sampling_params(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("refimpl chat: type a message; /new starts over; Ctrl-D quits.")
    while True:
        try:
            line = input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() == "/new":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        try:
            reply = stream(model, tokenizer, stop_ids, tokenizer.encode_chat(messages), params)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            reply = ""
            messages.pop()
        if reply:
            messages.append({"role": "assistant", "content": reply})
        print()
