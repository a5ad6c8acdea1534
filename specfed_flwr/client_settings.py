"""(gamma, K) per client and round: fixed, or chosen by that client's adaptive controller.

Fixed settings are the run's ``draft-length`` and ``top-k`` or a node's own (its ``node_config``).
With ``adaptive`` (the default) every client has an ``AdaptiveController`` (``theory.py``), fed
after every round it answered; its gamma is capped by ``max-gamma`` and its K by the client's fixed
K (the controller may lower K, never raise it past what the run allows). The Coordinator asks
``for_client`` when it plans a round and calls ``observe`` when the round is verified.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .theory import AdaptiveController, ControllerConfig, LinkProfile

if TYPE_CHECKING:
    from .config import SpecFedConfig
    from .protocol import DraftRequest
    from .wire import DraftReply


class ClientSettings:
    """The (gamma, K) each client is asked for (see the module docstring)."""

    def __init__(self, config: "SpecFedConfig", vocab_size: int,
                 per_client: dict[str, tuple[int, int]] | None = None) -> None:
        self.config = config
        self.vocab_size = int(vocab_size)
        self.per_client: dict[str, tuple[int, int]] = dict(per_client or {})
        self.links: dict[str, LinkProfile] = {}
        self.controllers: dict[str, AdaptiveController] = {}
        self._decoded: set[str] = set()  # clients with a timing from a decoding round (not a prefill one)

    def fixed(self) -> tuple[int, int]:
        """(gamma, K) without the controller: ``draft-length`` and ``top-k`` within the caps.

        A row with its own ``seed`` always drafts with these, so that its sampled output depends only
        on (prompt, seed, run settings, models): the adaptive choices follow measured timings, and
        the round boundaries (gamma) and the sparse distributions (K) shape which draws decide."""
        cfg = self.config
        return min(cfg.draft_length, cfg.max_gamma), min(cfg.top_k, cfg.max_k, self.vocab_size)

    def for_client(self, client: str) -> tuple[int, int]:
        """(gamma, K) for ``client`` this round: its fixed settings, or its controller's choice."""
        cfg = self.config
        gamma, k = self.per_client.get(client, (cfg.draft_length, cfg.top_k))
        if cfg.adaptive:
            controller = self.controller(client)
            gamma, k = controller.gamma, min(k, controller.k)
        return min(gamma, cfg.max_gamma), min(k, cfg.max_k, self.vocab_size)

    def set_fixed(self, client: str, gamma: int, k: int) -> None:
        self.per_client[client] = (int(gamma), int(k))

    def set_link(self, client: str, uplink_mbps: float, rtt_ms: float) -> None:
        self.links[client] = LinkProfile(uplink_bps=float(uplink_mbps) * 1e6, rtt_s=float(rtt_ms) / 1000.0)

    def controller(self, client: str) -> AdaptiveController:
        if client not in self.controllers:
            cfg = self.config
            self.controllers[client] = AdaptiveController(
                ControllerConfig(
                    gamma_init=min(max(cfg.draft_length, 1), cfg.max_gamma),
                    gamma_max=cfg.max_gamma,
                    k_init=cfg.top_k,
                    k_max=min(cfg.max_k, self.vocab_size),
                    vocab_size=self.vocab_size,
                    # greedy acceptance does not depend on K: only its bytes count
                    alpha_k_sensitivity=0.0 if cfg.greedy else 0.5,
                ),
                self.links.get(client, LinkProfile(cfg.uplink_mbps * 1e6, cfg.rtt_ms / 1000.0)),
            )
        return self.controllers[client]

    def observe(self, client: str, request: "DraftRequest | None", reply: "DraftReply", *, draft_seconds: float,
                wall_seconds: float, agreement: float | None, server_seconds: float = 0.0,
                device: dict | None = None) -> None:
        """Feed ``client``'s controller one verified round (SPEC theory: T = a*gamma + b).

        ``wall_seconds``: the round as the transport saw it (with cohorts in flight, that cohort's own
        exchange). A round in which the client received a whole sequence (start 0) also prefilled
        that prompt on the device and on the target, which inflates both times. A device that
        reports its prefill forwards (``prefill_seconds``, ``prefill_forwards``) has them taken out
        of its draft step cost (left in, the prompt's cost read as a draft step costing 5x its real
        cost and sent the next rounds to gamma 1); a device that does not report them leaves an
        estimate that errs towards short drafts. Such a round's times are used only while nothing
        better is known: the first decoding round's times replace them, and later prefill rounds
        give no timing.

        ``device``: the client's own metrics. One that shows drafting ahead (``compute_seconds``
        beyond ``draft_seconds``, over ``forward_steps`` forwards) switches the client's controller
        to the round cost of a device that drafts during the verify (``ahead_cost``): its ``a`` is
        then the device's compute per draft step, ahead work included, and its ``b`` the server's
        time plus the exchange's latency beyond drafting (``server_seconds``)."""
        positions = int(reply.lengths.sum())
        kept = reply.kept_mass()[reply.valid_mask()]
        controller = self.controller(client)
        prefilled = request is not None and bool((request.starts == 0).any())
        if not prefilled and client not in self._decoded:
            controller.forget_timing()
            self._decoded.add(client)
        device = device or {}
        compute, steps = float(device.get("compute_seconds", 0.0)), int(device.get("forward_steps", -1))
        prefill_s, prefill_n = float(device.get("prefill_seconds", 0.0)), int(device.get("prefill_forwards", 0))
        if steps > 0 and compute > draft_seconds + 1e-3:
            controller.config.drafts_ahead = True
        if prefilled and client in self._decoded:
            timing = {}
        elif controller.config.drafts_ahead and steps > 0:
            drafting = steps - prefill_n
            timing = {"round_cost": max(server_seconds + max(wall_seconds - draft_seconds, 0.0), 1e-4),
                      "draft_time_per_token": max(compute - prefill_s, 0.0) / drafting if drafting > 0 else None}
        else:
            # a = one draft step for the whole batch: the rows draft side by side, so a reply of
            # B rows x gamma positions took gamma steps (not B x gamma); forwards that fed prompts
            # are not draft steps (a device that counts its forwards says how many there were)
            steps_drafted = int(reply.lengths.max()) if positions else 0
            if steps >= 0 and prefill_n:
                steps_drafted = min(steps_drafted, steps - prefill_n)
            timing = {"round_cost": max(wall_seconds - draft_seconds, 1e-4),
                      "draft_time_per_token": (max(draft_seconds - prefill_s, 0.0) / steps_drafted
                                               if steps_drafted > 0 else None)}
        controller.update(
            alpha=agreement,
            **timing,
            kept_mass=float(kept.mean()) if kept.size else None,
            k=reply.k,
            gamma=int(reply.gamma),
            sequences=max(1, int(reply.batch_size)),
        )
