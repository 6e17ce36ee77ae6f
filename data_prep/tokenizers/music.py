"""Music tokenizers: the JSB chorale raster vocabulary (90 ids) and REMI through miditok (328 ids).

JSB (`JSBTokenizer`): a chorale is a list of 16th-note time steps, each holding the MIDI pitch of the four voices
(soprano, alto, tenor, bass; −1 or a missing voice is silence). It is written in raster order, step by step, four
tokens a step. The vocabulary is fixed (Music Transformer's set-up, 88 piano keys):

    id 0        PAD
    id 1        SILENCE      a voice that does not sound at this step
    id 2..89    Pitch_21 .. Pitch_108   (id = MIDI pitch − 19), contiguous and ascending

so transposing by k semitones is adding k to every id ≥ 2 (the training loader does that). There is no BOS/EOS:
every sample starts on a time-step boundary (a multiple of four tokens), so the voice of each token is implied by
its position, and the end of a chorale carries no information the model could use in a fixed-length window.

REMI (`REMITokenizer`): miditok's REMI with the configuration in `remi_config()`, vocabulary 328 including
PAD/BOS/EOS/MASK; all non-drum tracks of a file are merged into one stream (piano).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_prep.shards import TokenizerInfo

# ------------------------------------------------------------------------------------------------------------ JSB

VOICES = 4
LOWEST_PITCH, HIGHEST_PITCH = 21, 108  # A0..C8, the 88 piano keys
PAD_ID, SILENCE_ID = 0, 1
PITCH_ID_OFFSET = 2 - LOWEST_PITCH  # id = pitch + PITCH_ID_OFFSET
JSB_VOCAB = ["PAD", "SILENCE"] + [f"Pitch_{p}" for p in range(LOWEST_PITCH, HIGHEST_PITCH + 1)]


class JSBTokenizer:
    """Four-voice 16th-note chorales ↔ raster token ids (see the module docstring for the vocabulary)."""

    def __init__(self) -> None:
        self.info = TokenizerInfo(kind="jsb", vocab_size=len(JSB_VOCAB), pad=PAD_ID, vocab=list(JSB_VOCAB))

    def encode(self, item: Sequence[Sequence[float]]) -> np.ndarray:
        """A piece (time steps of up to four pitches; −1 or a missing voice is silence) → int64 ids, 4 a step.

        Raises ValueError for a step with more than four voices, a non-integer pitch or one outside 21..108.
        """
        ids = np.full((len(item), VOICES), SILENCE_ID, dtype=np.int64)
        for step, voices in enumerate(item):
            if len(voices) > VOICES:
                raise ValueError(f"time step {step} has {len(voices)} voices; at most {VOICES}")
            for voice, pitch in enumerate(voices):
                if pitch == -1:
                    continue
                if pitch != pitch or int(pitch) != pitch:  # NaN, or 60.5
                    raise ValueError(f"time step {step}, voice {voice}: pitch {pitch!r} is not a whole number")
                if not LOWEST_PITCH <= pitch <= HIGHEST_PITCH:
                    raise ValueError(f"time step {step}, voice {voice}: pitch {int(pitch)} is outside "
                                     f"{LOWEST_PITCH}..{HIGHEST_PITCH}")
                ids[step, voice] = int(pitch) + PITCH_ID_OFFSET
        return ids.reshape(-1)

    def decode(self, ids: Sequence[int] | np.ndarray) -> list[list[int]]:
        """Raster ids (whole time steps; PAD ids are dropped) → time steps of four pitches, −1 for silence."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids != PAD_ID]
        if len(ids) % VOICES:
            raise ValueError(f"{len(ids)} ids are not a whole number of {VOICES}-voice time steps")
        if len(ids) and (ids.min() < 0 or ids.max() >= len(JSB_VOCAB)):
            raise ValueError(f"ids must lie in 0..{len(JSB_VOCAB) - 1}")
        pitches = np.where(ids == SILENCE_ID, -1, ids - PITCH_ID_OFFSET)
        return pitches.reshape(-1, VOICES).tolist()

    def transpose(self, ids: np.ndarray, semitones: int) -> np.ndarray | None:
        """Ids with every pitch moved by `semitones` (PAD and SILENCE stay); None when a pitch would leave
        21..108, so the caller keeps the sample as it is (the training loader's augmentation)."""
        ids = np.asarray(ids)
        pitched = ids >= PITCH_ID_OFFSET + LOWEST_PITCH
        if not semitones or not pitched.any():
            return ids.copy()
        low, high = ids[pitched].min() + semitones, ids[pitched].max() + semitones
        if low < LOWEST_PITCH + PITCH_ID_OFFSET or high > HIGHEST_PITCH + PITCH_ID_OFFSET:
            return None
        return np.where(pitched, ids + semitones, ids).astype(ids.dtype)

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], tokenizer_dir: Path) -> "JSBTokenizer":
        """The tokenizer a manifest's `tokenizer` entry describes; refuses another vocabulary."""
        tokenizer = cls()
        if entry.get("kind") != "jsb" or entry.get("vocab") != JSB_VOCAB:
            raise ValueError("the manifest's jsb vocabulary differs from this version's; prepare the data again")
        return tokenizer


# ----------------------------------------------------------------------------------------------------------- REMI

REMI_FILE = "remi.json"


def remi_config() -> Any:
    """miditok's TokenizerConfig for piano performances; REMI with it has 328 ids:

    4 specials (PAD 0, BOS 1, EOS 2, MASK 3) + Bar + 88 pitches (21..108) + 32 velocities + 64 durations + 96
    positions + 9 time signatures + 32 rests + 2 sustain pedal (on/off) = 328.

    - beat_res {(0, 4): 8, (4, 12): 4}: onsets on a 32nd-note grid; durations up to 12 beats (miditok's default);
    - time signatures (miditok's default set, 9 of them): a bar and its positions follow the file's metre (the 96
      positions cover the longest bar, 12/8); unsupported ones fall back to 4/4;
    - rests (miditok's default resolution): a long silence is one token instead of a run of empty bars;
    - sustain pedal: a piano performance without its pedal is not the performance (MAESTRO records it);
    - no chords (derived, redundant with the notes), no tempos (MAESTRO's performance MIDI has one nominal tempo),
      no programs (one piano stream), no drum pitches.
    """
    import miditok

    return miditok.TokenizerConfig(
        pitch_range=(LOWEST_PITCH, HIGHEST_PITCH), beat_res={(0, 4): 8, (4, 12): 4}, num_velocities=32,
        special_tokens=["PAD", "BOS", "EOS", "MASK"], use_time_signatures=True, use_rests=True,
        use_sustain_pedals=True, use_chords=False, use_tempos=False, use_programs=False, use_pitchdrum_tokens=False,
        use_control_changes=False, use_pitch_bends=False, use_key_signatures=False)


class REMITokenizer:
    """A MIDI file (or symusic.Score) ↔ REMI ids, all non-drum tracks merged into one piano stream."""

    def __init__(self, remi: Any = None) -> None:
        import miditok

        self.remi = remi if remi is not None else miditok.REMI(remi_config())
        self.info = TokenizerInfo(kind="remi", vocab_size=len(self.remi), pad=self.remi["PAD_None"],
                                  bos=self.remi["BOS_None"], eos=self.remi["EOS_None"], file=REMI_FILE)

    @property
    def pitch_range(self) -> tuple[int, int]:
        low, high = self.remi.config.pitch_range
        return int(low), int(high)

    def prepare(self, item: Any) -> Any:
        """A path or Score → a Score of one track holding every non-drum note, preprocessed by miditok (time
        resampled to the token grid, notes outside the pitch range dropped). Reading errors propagate."""
        import symusic
        from miditok.utils import merge_tracks

        score = item if isinstance(item, symusic.Score) else symusic.Score(str(item))
        score = score.copy()
        score.tracks = [track for track in score.tracks if not track.is_drum]
        if len(score.tracks) > 1:
            merge_tracks(score)
        return self.remi.preprocess_score(score)

    def encode_prepared(self, score: Any) -> np.ndarray:
        """The ids of a Score from `prepare` (possibly transposed since), without BOS/EOS."""
        if not score.tracks or not score.note_num():
            return np.zeros(0, dtype=np.int64)
        sequences = self.remi.encode(score, no_preprocess_score=True)
        sequence = sequences[0] if isinstance(sequences, list) else sequences
        return np.asarray(sequence.ids, dtype=np.int64)

    def encode(self, item: Any) -> np.ndarray:
        """A MIDI path or symusic.Score → int64 REMI ids, without BOS/EOS."""
        return self.encode_prepared(self.prepare(item))

    def decode(self, ids: Sequence[int] | np.ndarray) -> Any:
        """REMI ids (special ids are dropped) → a symusic.Score with one track."""
        specials = set(self.remi.special_tokens_ids)
        ids = [int(i) for i in ids if int(i) not in specials]
        return self.remi.decode([ids])

    def save(self, folder: Path) -> str:
        """Write the tokenizer's parameters to folder/remi.json; return the file name for TokenizerInfo.file."""
        self.remi.save(Path(folder), filename=REMI_FILE)
        return REMI_FILE

    @classmethod
    def load(cls, path: Path) -> "REMITokenizer":
        import miditok

        if not Path(path).is_file():
            raise ValueError(f"REMI tokenizer file {path} is missing")
        return cls(miditok.REMI(params=Path(path)))

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], tokenizer_dir: Path) -> "REMITokenizer":
        """The tokenizer saved with a prep: tokenizer_dir/<entry['file']>."""
        return cls.load(Path(tokenizer_dir) / entry.get("file", REMI_FILE))
