"""Scoring a data set on a Ray cluster: `refimpl score --input IN --output OUT --ray ADDRESS`.

The driver (this process) reads the input and writes the output; it loads the tokenizer, never the
weights. Each Ray worker is an actor that loads the model once and scores one line at a time, the
same call as a single process makes (generate.prompt_logprobs, then scoring.output_line), so the
output file is the same bytes. The driver keeps every worker two lines ahead and writes the results
in input order as they complete, so a killed driver resumes like a killed single process.

A worker that dies (its process killed, its node lost) is restarted by Ray, loads the model again,
and Ray runs the lines it held again (max_restarts and max_task_retries are unlimited): the job
still writes every line once.

ADDRESS: "local" starts Ray in this process, with the machine's CPUs; "auto" joins the cluster that
`ray start` runs on this machine; HOST:PORT joins that cluster. Every node must have refimpl (with
its `ray` extra) installed and the model: a model name is pulled on each node into its own cache;
a directory must exist on every node.
"""

import os
import socket

from refimpl.scoring import output_line, read_items, write_in_order

AHEAD = 2  # lines each worker holds: one scoring, one waiting, so that it never idles between lines


class Scorer:
    """A Ray actor (see score_file_on_ray): the model loaded once, then a line at a time."""

    def __init__(self, model, device, top):
        from refimpl.generate import load
        from refimpl.pull import resolve_model

        self.model, self.tokenizer, _ = load(resolve_model(model), device)
        self.top = top

    def score(self, item):
        from refimpl.generate import prompt_logprobs

        return output_line(self.tokenizer, item, prompt_logprobs(self.model, self.tokenizer, item.ids, self.top),
                           self.top)

    def pid(self):
        return os.getpid()


def score_file_on_ray(address, model, input_path, output_path, top=0, workers=None, device="cpu", report=print,
                      progress=True):
    """Like scoring.score_file, with the lines spread over `workers` Ray actors (default: one per
    CPU of the cluster); returns (scored, skipped as already done, bad)."""
    # Clusters that `ray start` makes ask their drivers for a token (~/.ray/auth_token, made by the
    # first of them); Ray reads the mode when it is imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from refimpl.models import load_config
    from refimpl.pull import resolve_model
    from refimpl.tokenizer import Tokenizer

    model_dir = resolve_model(model)
    tokenizer = Tokenizer.from_dir(model_dir)
    items, skipped, bad = read_items(input_path, output_path, tokenizer, load_config(model_dir), report)
    if not items:
        return 0, skipped, bad
    if ":" in address:  # Ray retries a closed port for minutes: say so at once
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as error:
            raise RayScoringError(f"cannot join Ray at {address}: {error}") from None
    try:
        ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False)
    except (ConnectionError, ValueError) as error:
        raise RayScoringError(f"cannot join Ray at {address}: {error}") from None
    try:
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(Scorer)
        scorers = [actor.remote(model, device, top) for _ in range(min(workers, len(items)))]
        report(f"refimpl score: {len(scorers)} Ray workers on {address}")
        write_in_order(output_path, items, scored_lines(ray, scorers, items), progress)
    except ray.exceptions.RayError as error:  # a line that fails, not a worker that dies: Ray retries those
        raise RayScoringError(f"a Ray worker failed: {str(error).strip().splitlines()[-1]}") from None
    finally:
        ray.shutdown()
    return len(items), skipped, bad


class RayScoringError(Exception):
    """The run could not go on; the lines written so far stay, and a rerun resumes after them."""


def scored_lines(ray, scorers, items):
    """(item number, output line) as the workers finish them, each worker kept AHEAD lines ahead."""
    following = iter(range(len(items)))
    pending = {}  # object ref -> (item number, its worker)

    def hand(scorer):
        k = next(following, None)
        if k is not None:
            pending[scorer.score.remote(items[k])] = (k, scorer)

    for scorer in scorers:
        for _ in range(AHEAD):
            hand(scorer)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        k, scorer = pending.pop(ref)
        yield k, ray.get(ref)
        hand(scorer)
