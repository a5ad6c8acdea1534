"""A server run in its own process, for the kill/resume test (tests/test_resume.py).

``serve()`` (the ServerApp's body: results file, resume, strategy) over an in-process grid
that hands each message to the real ClientApp handlers of two local nodes, so the process can
be SIGKILLed without leaving simulation-engine processes behind. ``--round-delay`` slows each
round down so the test can kill it mid-run. Prints one JSON line at the end: the prompt indices
this run generated.

usage: python tests/resume_server.py RESULTS PROMPTS_JSON [--round-delay S]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import torch


class LocalGrid:
    def __init__(self, nodes: list[int], round_delay: float = 0.0):
        from flwr.app import Context, RecordDict

        self.nodes = nodes
        self.round_delay = round_delay
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
        self.inbox = []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        from specfed_flwr import client_app

        handlers = {"query.handshake": client_app.handshake, "query.draft": client_app.draft}
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(message.metadata.message_id)
            node = int(message.metadata.dst_node_id)
            self.inbox.append(handlers[message.metadata.message_type](message, self.contexts[node]))
        if any(m.metadata.message_type == "query.draft" for m in messages):
            time.sleep(self.round_delay)
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        out = [m for m in self.inbox if m.metadata.reply_to_message_id in wanted]
        self.inbox = [m for m in self.inbox if m.metadata.reply_to_message_id not in wanted]
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("prompts")
    parser.add_argument("--round-delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    from specfed_flwr.serve import serve

    cfg = {"target": "tiny:0", "draft": "tiny:1", "draft-quantization": "none", "device": "cpu",
           "chat-template": False, "results": args.results, "max-new-tokens": 6, "max-active-sequences": 2,
           "round-timeout": 30.0, "min-nodes": 2, "resume": True}
    prompts = json.loads(args.prompts)
    result = serve(LocalGrid([1, 2], args.round_delay), cfg, prompts=prompts)
    print(json.dumps({"generated": [s.index for s in result.sequences]}), flush=True)


if __name__ == "__main__":
    main()
