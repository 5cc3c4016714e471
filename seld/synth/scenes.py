"""One FOA recording: plan the events of a scene, render them in a room, add ambience.

A recording is planned as `max_polyphony` tracks of events with gaps (as the DCASE2024 synthetic
generator does); each event has a class, 100 ms onset/offset, a static or moving position and a
level. Rendering convolves each dry event with the room's FOA response: one response for a static
source; for a moving one, the early responses at every 100 ms frame boundary of its trajectory,
cross-faded with triangular weights (which sum to one), plus the position-independent diffuse tail.
Labels are the FOA CSV rows (frame, class, source, azimuth, elevation, distance) at frame centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import signal

from seld.config import LABEL_HOP_S, SAMPLE_RATE_HZ, SAMPLES_PER_LABEL_FRAME
from seld.synth import rooms, sounds

LEVEL_AT_1M = 0.03  # amplitude scale of a unit-RMS dry event (RMS of its direct path at 1 m, FOA W)
HEADROOM = 0.95  # recordings are scaled down so that |W| + |(X, Y)| (the stereo peak bound) stays below


@dataclass(frozen=True)
class DomainSpec:
    """What a recording of one domain may contain (built from SynthConfig by seld.synth)."""

    class_weights: tuple[float, ...]  # (13,) probabilities of each class (0 for excluded classes)
    max_polyphony: int
    first_track_fill: float  # fraction of time the first track is busy; track i: fill * 0.5**i
    same_class_overlap_p: float
    distance_m_range: tuple[float, float]
    elevation_deg_range: tuple[float, float]
    moving_fraction: float
    max_speed_deg_s: float
    snr_db_range: tuple[float, float]
    level_db_range: tuple[float, float]
    device_response: bool  # a random microphone/device frequency response per recording
    recording_gain_db_range: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Event:
    """One planned sound event of a recording (positions relative to the microphone)."""

    cls: int
    onset_frame: int
    n_frames: int
    source: int
    azimuth_deg: float  # at onset; wrapped to [-180, 180) in labels
    elevation_deg: float
    distance_m: float
    speed_deg_s: float  # azimuth rate, 0 for a static source
    level_db: float
    seed: int

    def azimuth_at(self, t_s: np.ndarray) -> np.ndarray:
        """Azimuth in degrees (unwrapped) at times `t_s` after the onset."""
        return self.azimuth_deg + self.speed_deg_s * np.asarray(t_s, dtype=np.float64)


def _draw_position(rng: np.random.Generator, room: rooms.Room, spec: DomainSpec, n_frames: int
                   ) -> tuple[float, float, float, float]:
    """(azimuth, elevation, distance, speed) whose whole trajectory keeps clear of the walls."""
    moving = rng.random() < spec.moving_fraction
    frame_t = np.arange(n_frames + 1) * LABEL_HOP_S
    for _ in range(100):
        az = float(rng.integers(-180, 180))
        el = float(rng.integers(int(np.ceil(spec.elevation_deg_range[0])), int(np.floor(spec.elevation_deg_range[1])) + 1))
        dist = float(rng.integers(int(round(spec.distance_m_range[0] * 100)), int(round(spec.distance_m_range[1] * 100)) + 1)) / 100
        speed = float(rng.uniform(10.0, spec.max_speed_deg_s) * rng.choice([-1, 1])) if moving and spec.max_speed_deg_s >= 10 else 0.0
        if rooms.fits(room, az + speed * frame_t, el, dist):
            return az, el, dist, speed
    # Validation of the config guarantees the nearest distance fits at elevation 0 in every direction.
    return float(rng.integers(-180, 180)), 0.0, spec.distance_m_range[0], 0.0


def plan_recording(rng: np.random.Generator, room: rooms.Room, spec: DomainSpec, n_frames: int,
                   forced_classes: tuple[int, ...] = ()) -> list[Event]:
    """Events of one recording of `n_frames` label frames.

    Args:
        rng: the recording's generator.
        room: where the recording is made (positions must fit in it).
        spec: the domain's scene statistics.
        n_frames: recording length in 100 ms frames.
        forced_classes: classes given, in order, to the first events planned (track 0 first, then
            the next tracks), so that a split contains every class even when the balance is skewed.

    Returns:
        events sorted by onset; at most `spec.max_polyphony` overlap at any frame.
    """
    weights = np.asarray(spec.class_weights, dtype=np.float64)
    events: list[Event] = []
    forced = list(forced_classes)
    for track in range(spec.max_polyphony):
        fill = min(0.95, spec.first_track_fill * 0.5**track)
        frame = int(rng.exponential(10.0 * (1 - fill) / fill)) if track > 0 else int(rng.integers(0, 5))
        while frame < n_frames:
            if forced:
                cls = forced.pop(0)
            else:
                w = weights.copy()
                if rng.random() >= spec.same_class_overlap_p:
                    busy = {e.cls for e in events if e.onset_frame < frame + 20 and e.onset_frame + e.n_frames > frame}
                    w_free = w.copy()
                    w_free[list(busy)] = 0.0
                    if w_free.sum() > 0:
                        w = w_free
                cls = int(rng.choice(len(w), p=w / w.sum()))
            lo, hi = sounds.DURATION_S[cls]
            length = int(round(rng.uniform(lo, hi) / LABEL_HOP_S))
            length = min(length, n_frames - frame)
            if length < 3:
                break
            az, el, dist, speed = _draw_position(rng, room, spec, length)
            events.append(Event(cls=cls, onset_frame=frame, n_frames=length, source=0, azimuth_deg=az,
                                elevation_deg=el, distance_m=dist, speed_deg_s=speed,
                                level_db=float(rng.uniform(*spec.level_db_range)),
                                seed=int(rng.integers(0, 2**63 - 1))))
            mean_gap = 10.0 * np.mean(sounds.DURATION_S[cls]) * (1 - fill) / fill
            frame += length + 1 + int(rng.exponential(mean_gap))
    events.sort(key=lambda e: (e.onset_frame, e.cls))
    return [Event(**{**e.__dict__, "source": i}) for i, e in enumerate(events)]


def event_labels(events: list[Event]) -> list[tuple[int, int, int, float, float, float]]:
    """FOA label rows (frame, class, source, azimuth deg wrapped, elevation deg, distance cm)."""
    rows = []
    for e in events:
        frames = np.arange(e.n_frames)
        az = e.azimuth_at((frames + 0.5) * LABEL_HOP_S)
        az = np.mod(np.rint(az) + 180.0, 360.0) - 180.0
        for f, a in zip(frames, az, strict=True):
            rows.append((int(e.onset_frame + f), e.cls, e.source, float(a), float(round(e.elevation_deg)),
                         float(round(e.distance_m * 100))))
    return rows


def _fftconv(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Full linear convolution of (..., n) with (..., m) along the last axis (broadcast).

    Single precision (the result is written as 16-bit audio); deterministic (pocketfft).
    """
    n = x.shape[-1] + h.shape[-1] - 1
    nfft = sfft.next_fast_len(n, real=True)
    x, h = np.asarray(x, dtype=np.float32), np.asarray(h, dtype=np.float32)
    return sfft.irfft(sfft.rfft(x, nfft) * sfft.rfft(h, nfft), nfft)[..., :n]


def render_event(event: Event, room: rooms.Room, tail: np.ndarray,
                 sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """The event as the FOA microphone records it, from its onset on.

    Args:
        event: the planned event.
        room: the room; `tail` is ``rooms.late_tail(room)`` (passed in so it is computed once).

    Returns:
        float64 (4, n_event + len(tail) - 1), channels W, Y, Z, X.
    """
    n = event.n_frames * SAMPLES_PER_LABEL_FRAME
    dry = sounds.synthesize_event(event.cls, n, np.random.default_rng(event.seed), sample_rate_hz)
    dry *= LEVEL_AT_1M * 10 ** (event.level_db / 20)
    if event.speed_deg_s == 0.0:
        h = tail.copy()
        h[:, : rooms.N_EARLY] += rooms.early_rir(room, event.azimuth_deg, event.elevation_deg, event.distance_m)
        return _fftconv(dry[None, :], h)
    out = _fftconv(dry[None, :], tail)
    hop = SAMPLES_PER_LABEL_FRAME
    knots = np.arange(event.n_frames + 1)
    # Triangular cross-fade weights centred on every frame boundary: they sum to one at every sample.
    ramp = np.concatenate([np.arange(hop) / hop, 1 - np.arange(hop) / hop])  # (2 hop,)
    padded = np.concatenate([np.zeros(hop), dry, np.zeros(hop)])
    segments = np.stack([padded[k * hop:(k + 2) * hop] * ramp for k in knots])  # (K, 2 hop)
    early = np.stack([rooms.early_rir(room, float(a), event.elevation_deg, event.distance_m)
                      for a in event.azimuth_at(knots * LABEL_HOP_S)])  # (K, 4, N_EARLY)
    parts = _fftconv(segments[:, None, :], early)  # (K, 4, 2 hop + N_EARLY - 1)
    seg_len = parts.shape[-1]
    acc = np.zeros((4, n + 2 * hop + seg_len))
    for k in knots:
        acc[:, k * hop:k * hop + seg_len] += parts[k]
    out[:, : n + rooms.N_EARLY - 1] += acc[:, hop:hop + n + rooms.N_EARLY - 1]
    return out


def _diffuse_noise(rng: np.random.Generator, n: int, sample_rate_hz: int) -> np.ndarray:
    """Diffuse ambience (4, n): W unit variance, X, Y, Z independent at a third of W's energy."""
    white = rng.standard_normal((4, n), dtype=np.float32)
    # A random spectral tilt between white and brown: a one-pole low-pass mixed with the white noise.
    # Variances are known in closed form: var(low-pass) = (1 - p) / (1 + p), and its covariance with
    # the white input is (1 - p); the mix is scaled to unit variance without measuring it.
    pole = rng.uniform(0.9, 0.995)
    coloured = signal.lfilter([1 - pole], [1, -pole], white, axis=1) / np.sqrt((1 - pole) / (1 + pole))
    mix = rng.uniform(0.1, 0.5)
    corr = np.sqrt(1 - pole**2)
    x = ((1 - mix) * coloured + mix * white) / np.sqrt((1 - mix) ** 2 + mix**2 + 2 * mix * (1 - mix) * corr)
    x[1:] *= np.sqrt(1.0 / 3.0)
    return x


def _device_response(rng: np.random.Generator, sample_rate_hz: int) -> np.ndarray:
    """A random device response as second-order sections: high-pass, a +-6 dB resonance, low-pass."""
    nyq = sample_rate_hz / 2
    hp = signal.butter(2, rng.uniform(80.0, 250.0) / nyq, btype="high", output="sos")
    lp = signal.butter(2, rng.uniform(6500.0, 10500.0) / nyq, btype="low", output="sos")
    b, a = signal.iirpeak(rng.uniform(500.0, 4000.0) / nyq, Q=rng.uniform(1.0, 3.0))
    gain = 10 ** (rng.uniform(-6.0, 6.0) / 20) - 1  # H = 1 + gain * band-pass: a peak or a notch
    peak = signal.tf2sos(np.asarray(a) + gain * np.asarray(b), a)
    return np.concatenate([hp, peak, lp])


def render_recording(events: list[Event], room: rooms.Room, spec: DomainSpec, n_frames: int,
                     rng: np.random.Generator, sample_rate_hz: int = SAMPLE_RATE_HZ,
                     tail: np.ndarray | None = None) -> np.ndarray:
    """Mix the rendered events, add ambience at a drawn SNR and apply the domain's device.

    `tail` is the room's ``rooms.late_tail`` when the caller caches it (computed here otherwise).

    Returns:
        float32 (4, n_frames * 2400) FOA (W, Y, Z, X), scaled so |W| + |(X, Y)| <= HEADROOM (so no
        stereo clip made by the FOA->stereo recipe clips).
    """
    n = n_frames * SAMPLES_PER_LABEL_FRAME
    if tail is None:
        tail = rooms.late_tail(room, sample_rate_hz)
    mix = np.zeros((4, n))
    active = np.zeros(n, dtype=bool)
    for e in events:
        start = e.onset_frame * SAMPLES_PER_LABEL_FRAME
        y = render_event(e, room, tail, sample_rate_hz)
        m = min(y.shape[1], n - start)
        mix[:, start:start + m] += y[:, :m]
        active[start:start + e.n_frames * SAMPLES_PER_LABEL_FRAME] = True
    signal_power = float(np.mean(mix[0, active] ** 2)) if active.any() else LEVEL_AT_1M**2
    snr_db = rng.uniform(*spec.snr_db_range)
    noise = _diffuse_noise(rng, n, sample_rate_hz)
    mix += noise * np.sqrt(signal_power / 10 ** (snr_db / 10))
    if spec.device_response:
        mix = signal.sosfilt(_device_response(rng, sample_rate_hz), mix, axis=1)
    mix *= 10 ** (rng.uniform(*spec.recording_gain_db_range) / 20)
    bound = float(np.max(np.abs(mix[0]) + np.hypot(mix[1], mix[3]))) if n else 0.0
    if bound > HEADROOM:
        mix *= HEADROOM / bound
    return mix.astype(np.float32)
