"""Procedural dry sounds for the 13 DCASE classes (spec §2): one mono signal per event, 24 kHz.

Every class has its own signature, drawn afresh per event (pitch, rhythm, envelope, spectrum), so a
small model can recognise classes without memorising a handful of samples. Each event fills its
labelled 100 ms frames: impulsive classes (clapping, footsteps, knock, ...) carry a faint texture
between impacts, so that no labelled frame is silent (checked by tests/test_synth.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import signal

from seld.config import N_CLASSES, SAMPLE_RATE_HZ

# Class-typical event durations in seconds (min, max); onsets and offsets sit on 100 ms frames.
DURATION_S: tuple[tuple[float, float], ...] = (
    (1.0, 4.0),  # Female speech
    (1.0, 4.0),  # Male speech
    (1.0, 3.0),  # Clapping
    (1.5, 4.0),  # Telephone
    (0.8, 2.5),  # Laughter
    (2.0, 5.0),  # Domestic sounds
    (1.5, 4.0),  # Walk, footsteps
    (0.6, 2.0),  # Door, open or close
    (2.0, 5.0),  # Music
    (1.5, 4.0),  # Musical instrument
    (1.5, 4.0),  # Water tap, faucet
    (1.0, 3.0),  # Bell
    (0.5, 1.5),  # Knock
)
PEAK_TO_RMS_MAX = 8.0  # crest factor cap: impulsive classes get a lower RMS instead of huge peaks
_FLOOR_DB = -30.0  # level of the between-impact texture of impulsive classes, re event RMS

# Vowel formants (F1, F2, F3 in Hz) of an average adult voice; scaled up for the female voice.
_VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410],
                    [300, 870, 2240], [660, 1720, 2410], [440, 1020, 2240]], dtype=np.float64)


def _t(n: int, sr: int) -> np.ndarray:
    return np.arange(n) / sr


def _biquad(kind: str, f0_hz: float, q: float, sr: int) -> np.ndarray:
    """One RBJ-cookbook biquad ("band": 0 dB peak band-pass, "low": low-pass) as an sos row.

    Designed in closed form: scipy's general filter design costs more than filtering a whole event.
    """
    w0 = 2 * np.pi * f0_hz / sr
    cos, alpha = np.cos(w0), np.sin(w0) / (2 * q)
    b = [alpha, 0.0, -alpha] if kind == "band" else [(1 - cos) / 2, 1 - cos, (1 - cos) / 2]
    a0 = 1 + alpha
    return np.array([[*(v / a0 for v in b), 1.0, -2 * cos / a0, (1 - alpha) / a0]])


def _bandpass(x: np.ndarray, lo_hz: float, hi_hz: float, sr: int, order: int = 2) -> np.ndarray:
    """Band-pass between lo_hz and hi_hz: `order` cascaded biquads at the geometric centre."""
    lo = max(lo_hz, 20.0)
    hi = max(min(hi_hz, 0.45 * sr), lo * 1.05)
    centre = np.sqrt(lo * hi)
    return signal.sosfilt(np.repeat(_biquad("band", centre, centre / (hi - lo), sr), order, axis=0), x)


def _lowpass(x: np.ndarray, hz: float, sr: int, order: int = 2) -> np.ndarray:
    """Low-pass: `order // 2` (at least one) cascaded Butterworth-Q biquads."""
    sos = _biquad("low", min(hz, 0.45 * sr), 1 / np.sqrt(2), sr)
    return signal.sosfilt(np.repeat(sos, max(1, order // 2), axis=0), x)


def _decay_env(n: int, tau_s: float, sr: int, attack_s: float = 0.002) -> np.ndarray:
    t = _t(n, sr)
    return np.minimum(t / attack_s, 1.0) * np.exp(-t / tau_s)


def _place(out: np.ndarray, snippet: np.ndarray, start: int) -> None:
    if start >= len(out):
        return
    end = min(len(out), start + len(snippet))
    out[start:end] += snippet[: end - start]


def _impact_times(n: int, sr: int, rng: np.random.Generator, rate_hz: float, jitter: float) -> list[int]:
    """Onsets (samples) of a roughly periodic train at `rate_hz` with relative timing jitter."""
    times, t = [], rng.uniform(0.0, 0.3 / rate_hz)
    while t * sr < n - 0.02 * sr:
        times.append(int(t * sr))
        t += (1.0 + rng.uniform(-jitter, jitter)) / rate_hz
    return times


def _resonator_sos(freq_hz: float, bw_hz: float, sr: int) -> np.ndarray:
    """One second-order resonance (unit gain at DC removed) as an sos row."""
    r = np.exp(-np.pi * bw_hz / sr)
    theta = 2 * np.pi * freq_hz / sr
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return np.array([[1.0 - r, 0.0, -(1.0 - r), *a]])


def _voice(n: int, sr: int, rng: np.random.Generator, f0_range: tuple[float, float],
           formant_scale: float, syllable_hz: tuple[float, float]) -> np.ndarray:
    """Voiced speech-like signal: glottal pulse source, per-syllable vowel formants, syllable rhythm."""
    t = _t(n, sr)
    f0_base = rng.uniform(*f0_range)
    # Intonation: a random smooth contour with slow declination.
    knots = rng.uniform(-0.12, 0.12, size=max(3, int(n / sr * 3) + 2))
    contour = np.interp(t, np.linspace(0, t[-1] if n > 1 else 1, len(knots)), knots)
    f0 = f0_base * (1 + contour - 0.08 * t / max(t[-1], 1e-3))
    cycles = np.cumsum(f0) / sr
    saw = 2 * (cycles - np.floor(cycles)) - 1
    source = _lowpass(np.diff(saw, prepend=saw[0]) * -1 + 0.02 * rng.standard_normal(n), 4500.0, sr)
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + int(sr / rng.uniform(*syllable_hz))))
    out = np.zeros(n)
    bw = np.array([80.0, 110.0, 160.0]) * formant_scale
    zi = np.zeros((3, 2))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        vowel = _VOWELS[rng.integers(0, len(_VOWELS))] * formant_scale * rng.uniform(0.92, 1.08)
        sos = np.concatenate([_resonator_sos(f, w, sr) for f, w in zip(vowel, bw, strict=True)])
        seg, zi = signal.sosfilt(sos, source[a:b], zi=zi)
        u = np.linspace(0, np.pi, b - a)
        seg = seg * (0.25 + 0.75 * np.sin(u) ** 0.7 * rng.uniform(0.6, 1.0))
        if rng.random() < 0.5:  # an unvoiced consonant at the syllable start
            m = min(b - a, int(rng.uniform(0.03, 0.07) * sr))
            burst = _bandpass(rng.standard_normal(m), rng.uniform(2500, 4000), 7000, sr) * np.hanning(m)
            seg[:m] += 0.6 * burst * np.std(seg) / (np.std(burst) + 1e-9)
        out[a:b] = seg
    return out


def female_speech(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    return _voice(n, sr, rng, (170.0, 260.0), 1.17, (3.5, 6.0))


def male_speech(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    return _voice(n, sr, rng, (85.0, 150.0), 1.0, (3.0, 5.0))


def clapping(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Noise-burst train: one band-passed burst per clap at 2.5-6 claps/s."""
    out = np.zeros(n)
    centre = rng.uniform(900.0, 2500.0)
    for start in _impact_times(n, sr, rng, rng.uniform(2.5, 6.0), 0.15):
        m = int(0.08 * sr)
        burst = _bandpass(rng.standard_normal(m), centre * 0.5, centre * 2.2, sr)
        _place(out, burst * _decay_env(m, rng.uniform(0.008, 0.02), sr) * rng.uniform(0.7, 1.0), start)
    return out


def telephone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Dual-tone ring: two tones (trilled at 15-25 Hz) in on/off cadence."""
    t = _t(n, sr)
    f1 = rng.uniform(400.0, 1100.0)
    f2 = f1 * rng.uniform(1.08, 1.35)
    trill = 0.5 * (1 + np.sign(np.sin(2 * np.pi * rng.uniform(15.0, 25.0) * t)))
    tone = trill * np.sin(2 * np.pi * f1 * t) + (1 - trill) * np.sin(2 * np.pi * f2 * t)
    tone += 0.3 * np.sin(2 * np.pi * 2 * f1 * t)
    on_s, off_s = rng.uniform(0.4, 1.0), rng.uniform(0.15, 0.3)
    cadence = (np.mod(t, on_s + off_s) < on_s).astype(np.float64)
    cadence = np.convolve(cadence, np.ones(48) / 48, mode="same")
    return tone * cadence


def laughter(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Breathy harmonic 'ha' bursts at 4-6 Hz with falling pitch."""
    out = np.zeros(n)
    f0_start = rng.uniform(200.0, 380.0)
    times = _impact_times(n, sr, rng, rng.uniform(4.0, 6.0), 0.1)
    for k, start in enumerate(times):
        m = int(rng.uniform(0.1, 0.16) * sr)
        tt = _t(m, sr)
        f0 = f0_start * (1 - 0.25 * k / max(len(times), 1)) * (1 - 0.1 * tt / tt[-1])
        ph = 2 * np.pi * np.cumsum(f0) / sr
        voiced = sum(np.sin(h * ph) / h for h in range(1, 12))
        breath = _bandpass(rng.standard_normal(m), 800.0, 5000.0, sr)
        burst = (0.6 * voiced + 0.5 * breath / (np.std(breath) + 1e-9)) * np.hanning(m)
        _place(out, burst, start)
    return out


def domestic(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Appliance: mains hum harmonics, a motor whine and broadband filtered noise, slowly modulated."""
    t = _t(n, sr)
    mains = rng.choice([50.0, 60.0])
    hum = sum(np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 6.28)) / h for h in range(1, 6))
    whine_f = rng.uniform(200.0, 900.0)
    whine = np.sin(2 * np.pi * whine_f * t * (1 + 0.01 * np.sin(2 * np.pi * 0.7 * t)))
    lo = rng.uniform(150.0, 800.0)
    noise = _bandpass(rng.standard_normal(n), lo, lo * rng.uniform(3.0, 8.0), sr)
    noise /= np.std(noise) + 1e-9
    mix = rng.dirichlet([1.0, 1.0, 1.0])
    mod = 1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 2.0) * t)
    ramp = np.minimum(1.0, t / 0.15) * np.minimum(1.0, (t[-1] - t) / 0.15 + 0.05)
    return (mix[0] * hum + mix[1] * whine + mix[2] * 1.5 * noise) * mod * ramp


def footsteps(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Low thuds at walking pace (1.5-2.3 steps/s) with a heel-toe click."""
    out = np.zeros(n)
    f_body = rng.uniform(55.0, 120.0)
    for start in _impact_times(n, sr, rng, rng.uniform(1.5, 2.3), 0.08):
        m = int(0.15 * sr)
        tt = _t(m, sr)
        thud = np.sin(2 * np.pi * f_body * tt) * _decay_env(m, 0.03, sr)
        click = _lowpass(rng.standard_normal(m), 2500.0, sr) * _decay_env(m, 0.006, sr)
        _place(out, thud + 0.4 * click, start)
    return out


def door(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Creak (stick-slip pulse train, drifting rate) followed by an impact with rattle."""
    out = np.zeros(n)
    n_impact = min(n // 2, int(0.35 * sr))
    n_creak = n - n_impact
    rate = np.interp(np.arange(n_creak), [0, n_creak], rng.uniform(15.0, 90.0, size=2))
    rate *= 1 + 0.15 * rng.standard_normal(n_creak).cumsum() / np.sqrt(np.arange(1, n_creak + 1))
    pulses = np.diff(np.floor(np.cumsum(np.abs(rate)) / sr), prepend=0.0)
    centre = rng.uniform(500.0, 1800.0)
    creak = _bandpass(pulses * (1 + 0.3 * rng.standard_normal(n_creak)), centre * 0.6, centre * 1.8, sr, order=3)
    creak *= np.hanning(n_creak) ** 0.3
    out[:n_creak] = creak / (np.std(creak) + 1e-9)
    tt = _t(n_impact, sr)
    f_imp = rng.uniform(70.0, 160.0)
    impact = np.sin(2 * np.pi * f_imp * tt) * _decay_env(n_impact, 0.05, sr)
    rattle = _bandpass(rng.standard_normal(n_impact), 1500.0, 6000.0, sr) * _decay_env(n_impact, 0.03, sr)
    out[n_creak:] += 4.0 * (impact + 0.5 * rattle)
    return out


def _note(f0: float, m: int, sr: int, n_harm: int, tau_s: float, rng: np.random.Generator) -> np.ndarray:
    tt = _t(m, sr)
    amps = rng.uniform(0.3, 1.0, size=n_harm) / np.arange(1, n_harm + 1)
    tone = sum(a * np.sin(2 * np.pi * f0 * (h + 1) * tt) for h, a in enumerate(amps) if f0 * (h + 1) < 8000)
    return tone * _decay_env(m, tau_s, sr, attack_s=0.01)


def music(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Polyphonic chords (major/minor triads + bass) changing every 0.4-1 s."""
    out = np.zeros(n)
    root = 220.0 * 2 ** (rng.integers(-5, 7) / 12)
    seg = int(rng.uniform(0.4, 1.0) * sr)
    degrees = [0, 5, 7, 9, 3, 10]
    start = 0
    while start < n:
        r = root * 2 ** (rng.choice(degrees) / 12)
        third = 4 if rng.random() < 0.6 else 3
        chord = [r, r * 2 ** (third / 12), r * 2 ** (7 / 12), r / 2]
        m = min(seg + int(0.1 * sr), n - start)
        tones = sum(_note(f, m, sr, 6, seg / sr * 1.5, rng) for f in chord)
        _place(out, tones, start)
        start += seg
    return out


def instrument(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Plucked-string melody (Karplus-Strong) on a pentatonic scale, 0.15-0.4 s per note."""
    out = np.zeros(n)
    base = 196.0 * 2 ** (rng.integers(0, 12) / 12)
    scale = [0, 2, 4, 7, 9, 12, 14, 16]
    note_s = rng.uniform(0.15, 0.4)
    start = 0
    while start < n:
        f0 = base * 2 ** (rng.choice(scale) / 12)
        period = max(2, int(round(sr / f0)))
        m = min(int(note_s * sr * 2), n - start)
        # Karplus-Strong: y[n] = burst[n] + 0.498 (y[n - p] + y[n - p - 1]), a damped delay line.
        burst = np.zeros(m)
        burst[:min(period, m)] = rng.uniform(-1, 1, size=period)[:m]
        a = np.zeros(period + 2)
        a[0], a[period], a[period + 1] = 1.0, -0.498, -0.498
        y = signal.lfilter([1.0], a, burst)
        _place(out, y, start)
        start += int(note_s * sr * rng.uniform(0.8, 1.2))
    return out


def water_tap(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Fluctuating band-passed noise with bubble chirps."""
    t = _t(n, sr)
    lo = rng.uniform(700.0, 2000.0)
    noise = _bandpass(rng.standard_normal(n), lo, lo * rng.uniform(2.5, 5.0), sr)
    flutter = _lowpass(rng.standard_normal(n), rng.uniform(8.0, 25.0), sr)
    flutter = 1 + 1.5 * flutter / (np.std(flutter) + 1e-9)
    out = noise / (np.std(noise) + 1e-9) * np.clip(flutter, 0.2, None)
    for start in _impact_times(n, sr, rng, rng.uniform(8.0, 20.0), 0.8):
        m = int(0.02 * sr)
        tt = _t(m, sr)
        f = rng.uniform(600.0, 2500.0) * (1 + 2 * tt / tt[-1])
        _place(out, 1.5 * np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(m), start)
    return out * np.minimum(1.0, t / 0.05)


def bell(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Inharmonic decaying partials (church/hand-bell ratios), struck every 0.5-1.5 s."""
    out = np.zeros(n)
    f0 = rng.uniform(400.0, 1400.0)
    ratios = np.array([0.5, 1.0, 1.183, 1.506, 2.0, 2.514, 2.662, 3.011, 4.166])
    ratios = ratios * (1 + 0.01 * rng.standard_normal(len(ratios)))
    tau = rng.uniform(0.4, 1.2)
    for start in _impact_times(n, sr, rng, 1.0 / rng.uniform(0.5, 1.5), 0.1):
        m = n - start
        tt = _t(m, sr)
        strike = sum(np.sin(2 * np.pi * f0 * r * tt) * np.exp(-tt * (1 + r) / (2 * tau)) / (1 + 0.3 * r)
                     for r in ratios if f0 * r < 10000)
        _place(out, strike * np.minimum(1.0, tt / 0.002), start)
    return out


def knock(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Groups of 2-4 short resonant (wooden) impacts."""
    out = np.zeros(n)
    f_res = rng.uniform(180.0, 600.0)
    b, a = signal.iirpeak(f_res / (sr / 2), Q=rng.uniform(6.0, 15.0))
    group_gap = rng.uniform(0.3, 0.6)
    rate = rng.uniform(4.0, 8.0)
    t = 0.0
    while t * sr < n - 0.02 * sr:
        for _ in range(rng.integers(2, 5)):
            if t * sr >= n - 0.02 * sr:
                break
            m = int(0.08 * sr)
            exc = rng.standard_normal(m) * _decay_env(m, 0.003, sr, attack_s=0.0005)
            _place(out, signal.lfilter(b, a, exc) + 0.3 * _lowpass(exc, 2500.0, sr), int(t * sr))
            t += 1.0 / rate * rng.uniform(0.85, 1.15)
        t += group_gap
    return out


SYNTHS: tuple[Callable[[int, int, np.random.Generator], np.ndarray], ...] = (
    female_speech, male_speech, clapping, telephone, laughter, domestic, footsteps, door, music,
    instrument, water_tap, bell, knock,
)
_IMPULSIVE = frozenset({2, 3, 4, 6, 7, 9, 11, 12})  # classes with gaps between sounds
assert len(SYNTHS) == N_CLASSES == len(DURATION_S)


def synthesize_event(cls: int, n_samples: int, rng: np.random.Generator,
                     sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """A dry mono event of class `cls`.

    Args:
        cls: class index 0..12 (spec §2).
        n_samples: length in samples (the event's labelled frames times 2400 at 24 kHz).
        rng: the event's own generator (everything about the sound is drawn from it).
        sample_rate_hz: sampling rate.

    Returns:
        float64 (n_samples,), RMS 1 unless the crest factor would exceed ``PEAK_TO_RMS_MAX``
        (then peak = PEAK_TO_RMS_MAX and RMS < 1); 5 ms fades at both ends.
    """
    x = np.asarray(SYNTHS[cls](n_samples, sample_rate_hz, rng), dtype=np.float64)
    x -= np.mean(x)
    rms = np.sqrt(np.mean(x**2)) + 1e-12
    if cls in _IMPULSIVE:
        # Faint texture between impacts (rustle, breath, rattle), so labelled frames are never silent.
        floor = _bandpass(rng.standard_normal(n_samples), 200.0, 4000.0, sample_rate_hz)
        x += floor / (np.std(floor) + 1e-12) * rms * 10 ** (_FLOOR_DB / 20)
    x /= max(np.sqrt(np.mean(x**2)), np.max(np.abs(x)) / PEAK_TO_RMS_MAX) + 1e-12
    fade = min(int(0.005 * sample_rate_hz), n_samples // 4)
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        x[:fade] *= ramp
        x[n_samples - fade:] *= ramp[::-1]
    return x
