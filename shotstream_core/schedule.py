"""Flow-matching schedule of Wan2.1 / Self-Forcing: shifted sigmas, few-step list, noise and x0.

x_t = (1 - sigma) x0 + sigma * noise; the model predicts the flow v = noise - x0, so x0 = x_t - sigma * v.
"""
from __future__ import annotations

import torch


class FlowSchedule:
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 8.0):
        self.num_train_timesteps = num_train_timesteps
        raw = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
        self.sigmas = shift * raw / (1 + (shift - 1) * raw)  # [N], decreasing from 1
        self.timesteps = self.sigmas * num_train_timesteps

    def warp(self, raw_steps) -> torch.Tensor:
        """Raw few-step list (e.g. 1000, 750, 500, 250) -> timesteps on the shifted table."""
        idx = torch.tensor([self.num_train_timesteps - int(s) for s in raw_steps])
        return self.timesteps[idx].float()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of the nearest table timestep, same shape as t."""
        table = self.timesteps.to(t.device)
        idx = (t.to(torch.float64)[..., None] - table).abs().argmin(-1)
        return self.sigmas.to(t.device)[idx].float()

    @staticmethod
    def _expand(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample [B] or per-frame [B, F] values -> broadcastable to latents [B, C, F, h, w]."""
        if s.dim() == 1:
            return s.view(-1, 1, 1, 1, 1)
        return s[:, None, :, None, None]

    def add_noise(self, x0, noise, t):
        # mixed in float32 and rounded once, as the reference: sigma rounded to bf16 first is another t
        s = self._expand(self.sigma(t), x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def x0_from_flow(self, x_t, flow, t):
        s = self._expand(self.sigma(t), x_t)
        return (x_t.float() - s * flow.float()).to(x_t.dtype)

    def flow_target(self, x0, noise):
        return noise - x0

    def training_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Gaussian in t centred at 500, shifted so w(1000) = 0, normalised to mean 1 over the table."""
        def bell(x):
            return torch.exp(-2 * ((x - self.num_train_timesteps / 2) / self.num_train_timesteps) ** 2)
        floor = bell(torch.tensor(float(self.num_train_timesteps), dtype=torch.float64))
        mean = (bell(self.timesteps) - floor).mean()
        return ((bell(t.to(torch.float64)) - floor) / mean).float()

    def sample_training_t(self, shape, low: int = 0, high: int | None = None, generator=None) -> torch.Tensor:
        """Uniform table index in [low, high) -> its timestep."""
        high = self.num_train_timesteps if high is None else high
        idx = torch.randint(low, high, shape, generator=generator)
        return self.timesteps[idx].float()
