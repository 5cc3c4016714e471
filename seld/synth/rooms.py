"""Shoebox rooms and their first-order Ambisonics (FOA) impulse responses, 24 kHz.

A room impulse response (RIR) here has two parts:
* early: the direct path and every image source (Allen & Berkley 1979) arriving within
  ``EARLY_S`` of emission; each image adds an impulse at its delay (linear fractional delay),
  scaled by 1/r and the wall reflection coefficients, and encoded into FOA gains by its direction.
* late: a diffuse tail after ``EARLY_S``: independent noise from ``N_TAIL_DIRECTIONS`` directions
  spread evenly over the sphere, each FOA-encoded, under an exponential decay of the room's RT60.
  Its energy follows statistical room acoustics (reverberant energy 16π/R relative to the direct
  path's 1/r², R = S·ᾱ/(1 − ᾱ)), so the direct-to-reverberant ratio falls with distance.

FOA convention (spec §4): ACN channel order W, Y, Z, X with SN3D gains W = 1, Y = sin(az)cos(el),
Z = sin(el), X = cos(az)cos(el); azimuth counter-clockwise from the front (+x), positive = left (+y).
In a diffuse field X, Y and Z each carry a third of W's energy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from seld.config import SAMPLE_RATE_HZ, sabine_absorption

SPEED_OF_SOUND_M_S = 343.0
EARLY_S = 0.08  # image sources arriving within this time of emission; the diffuse tail after it
N_EARLY = 2048  # samples kept for the early part (>= EARLY_S at 24 kHz plus the interpolation tap)
TAIL_FADE_S = 0.01  # cross-fade from the image sources to the diffuse tail
N_TAIL_DIRECTIONS = 64
MIN_WALL_DISTANCE_M = 0.3  # sources and the microphone keep at least this far from every wall


@dataclass(frozen=True)
class Room:
    """A shoebox room with the FOA microphone inside it.

    Attributes:
        room_id: the `room<R>` number in file names (unique over all sites and domains).
        size_m: (3,) length, width, height in metres.
        rt60_s: reverberation time (Sabine) in seconds; 0 means anechoic (no reflections, no tail).
        mic_m: (3,) microphone position in metres.
        tail_seed: seed of the diffuse tail's noise (one tail per room).
    """

    room_id: int
    size_m: tuple[float, float, float]
    rt60_s: float
    mic_m: tuple[float, float, float]
    tail_seed: int = 0

    @property
    def volume_m3(self) -> float:
        return float(np.prod(self.size_m))

    @property
    def surface_m2(self) -> float:
        lx, ly, lz = self.size_m
        return 2.0 * (lx * ly + lx * lz + ly * lz)

    @property
    def absorption(self) -> float:
        """Mean absorption coefficient ᾱ from Sabine's formula RT60 = 0.161 V / (S ᾱ)."""
        if self.rt60_s <= 0:
            return 1.0
        return sabine_absorption(self.size_m, self.rt60_s)

    @property
    def reverberant_energy(self) -> float:
        """Energy of the whole reverberant response relative to a direct path of amplitude 1 at 1 m."""
        a = self.absorption
        if a >= 1.0:
            return 0.0
        room_constant = self.surface_m2 * a / (1.0 - a)
        return 16.0 * np.pi / room_constant


def foa_gains(azimuth_deg, elevation_deg) -> np.ndarray:
    """SN3D gains (W, Y, Z, X) for directions; arrays broadcast. Returns (4, ...) float64."""
    az = np.deg2rad(np.asarray(azimuth_deg, dtype=np.float64))
    el = np.deg2rad(np.asarray(elevation_deg, dtype=np.float64))
    return np.stack([np.ones_like(az * el), np.sin(az) * np.cos(el), np.sin(el) * np.ones_like(az),
                     np.cos(az) * np.cos(el)])


def source_position(room: Room, azimuth_deg: float, elevation_deg: float, distance_m: float) -> np.ndarray:
    """Cartesian position (3,) in metres of a source at (az, el, r) from the microphone."""
    az, el = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
    offset = distance_m * np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
    return np.asarray(room.mic_m) + offset


def fits(room: Room, azimuth_deg, elevation_deg, distance_m, margin_m: float = MIN_WALL_DISTANCE_M) -> bool:
    """Whether source position(s) (arrays broadcast) all lie at least `margin_m` inside the walls."""
    az, el = np.deg2rad(np.asarray(azimuth_deg, float)), np.deg2rad(np.asarray(elevation_deg, float))
    r = np.asarray(distance_m, float)
    pos = np.stack([r * np.cos(az) * np.cos(el), r * np.sin(az) * np.cos(el), r * np.sin(el) * np.ones_like(az)])
    pos = pos + np.asarray(room.mic_m).reshape(3, *([1] * (pos.ndim - 1)))
    size = np.asarray(room.size_m).reshape(3, *([1] * (pos.ndim - 1)))
    return bool(np.all((pos >= margin_m) & (pos <= size - margin_m)))


@lru_cache(maxsize=32)
def _image_lattice(room: Room, max_path_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per axis: image index n, mirror flag q and reflection counts |n - q| + |n| (all combos)."""
    sizes = np.asarray(room.size_m)
    axes = []
    for length in sizes:
        n_max = int(np.ceil(max_path_m / (2 * length))) + 1
        n = np.arange(-n_max, n_max + 1)
        nn, qq = np.meshgrid(n, [0, 1], indexing="ij")
        axes.append((nn.ravel(), qq.ravel()))
    grids = [np.meshgrid(axes[0][k], axes[1][k], axes[2][k], indexing="ij") for k in range(2)]
    n_idx = np.stack([g.ravel() for g in grids[0]])  # (3, M)
    q_idx = np.stack([g.ravel() for g in grids[1]])
    order = np.abs(n_idx - q_idx) + np.abs(n_idx)
    return n_idx, q_idx, order.sum(axis=0)


def early_rir(room: Room, azimuth_deg: float, elevation_deg: float, distance_m: float,
              sample_rate_hz: int = SAMPLE_RATE_HZ, n_samples: int = N_EARLY) -> np.ndarray:
    """Direct path + image sources arriving before ``EARLY_S``, FOA-encoded.

    Args:
        room: the room (rt60_s = 0: anechoic, direct path only).
        azimuth_deg, elevation_deg, distance_m: source position relative to the microphone.
        sample_rate_hz: sampling rate.
        n_samples: length of the response.

    Returns:
        float64 (4, n_samples), channels W, Y, Z, X. The direct path has amplitude 1/distance_m in W
        at delay distance_m / c (fractional delays by linear interpolation).
    """
    mic = np.asarray(room.mic_m, dtype=np.float64)
    src = source_position(room, azimuth_deg, elevation_deg, distance_m)
    if room.rt60_s <= 0:
        pos = src[:, None]
        n_refl = np.zeros(1)
    else:
        max_path = EARLY_S * SPEED_OF_SOUND_M_S
        n_idx, q_idx, n_refl = _image_lattice(room, max_path)
        size = np.asarray(room.size_m)[:, None]
        pos = (1 - 2 * q_idx) * src[:, None] + 2 * n_idx * size
    rel = pos - mic[:, None]
    dist = np.sqrt(np.sum(rel**2, axis=0))
    delay = dist / SPEED_OF_SOUND_M_S * sample_rate_hz
    keep = delay < min(EARLY_S * sample_rate_hz, n_samples - 2)
    rel, dist, delay, n_refl = rel[:, keep], dist[keep], delay[keep], n_refl[keep]
    beta = np.sqrt(max(0.0, 1.0 - room.absorption))
    amp = beta**n_refl / np.maximum(dist, 1e-3)
    gains = np.stack([np.ones_like(dist), rel[1] / dist, rel[2] / dist, rel[0] / dist]) * amp
    i0 = np.floor(delay).astype(np.int64)
    frac = delay - i0
    idx = np.concatenate([i0, i0 + 1])
    out = np.empty((4, n_samples))
    for ch in range(4):
        w = np.concatenate([gains[ch] * (1 - frac), gains[ch] * frac])
        out[ch] = np.bincount(idx, weights=w, minlength=n_samples)[:n_samples]
    return out


def _sphere_directions(n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` near-uniform directions (Fibonacci sphere): azimuth, elevation in degrees."""
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    az = np.rad2deg(np.mod(np.pi * (1 + 5**0.5) * k, 2 * np.pi))
    return az, np.rad2deg(np.arcsin(z))


def late_tail(room: Room, sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """The room's diffuse tail, zero before ``EARLY_S - TAIL_FADE_S``.

    Returns:
        float64 (4, n) with n covering 1.1 x RT60 (at least N_EARLY); zeros if anechoic. The
        energy of W from time 0 on follows E·k·exp(−k t) per second, E = room.reverberant_energy,
        k = 6 ln 10 / RT60; X, Y, Z each carry a third of W's energy (diffuse field, SN3D).
    """
    n = max(N_EARLY, int(1.1 * max(room.rt60_s, 0.0) * sample_rate_hz))
    if room.rt60_s <= 0 or room.reverberant_energy == 0.0:
        return np.zeros((4, n))
    rng = np.random.default_rng(room.tail_seed)
    az, el = _sphere_directions(N_TAIL_DIRECTIONS)
    enc = foa_gains(az, el)  # (4, K)
    noise = rng.standard_normal((N_TAIL_DIRECTIONS, n))
    tail = enc @ noise / np.sqrt(N_TAIL_DIRECTIONS)  # W has unit variance per sample
    t = np.arange(n) / sample_rate_hz
    k = 6.0 * np.log(10.0) / room.rt60_s
    envelope = np.sqrt(room.reverberant_energy * k * np.exp(-k * t) / sample_rate_hz)
    fade = np.clip((t - (EARLY_S - TAIL_FADE_S)) / TAIL_FADE_S, 0.0, 1.0)
    return tail * envelope * np.sin(0.5 * np.pi * fade) ** 2
