"""OpenAI `/v1/audio/transcriptions` response bodies from a Transcription: json | text | srt | verbose_json | vtt.

Shapes follow OpenAI's API (whisper-1) and vLLM: `json` = {"text", "usage"}, `verbose_json` adds task, language
(English name, as OpenAI writes it), duration and segments; usage is vLLM's {"type": "duration", "seconds"}.
srt/vtt/verbose_json need segment times: ask the recognizer for timestamps (`needs_timestamps`).
"""

from __future__ import annotations

import math
from typing import Any

from autoglm.errors import InvalidRequest
from autoglm.speech.recognizer import Segment, Transcription

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
CONTENT_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}

# Whisper's languages: ISO 639-1 (or -3) code -> the English name OpenAI returns in verbose_json.
_LANGS = (
    "en english,zh chinese,de german,es spanish,ru russian,ko korean,fr french,ja japanese,pt portuguese,"
    "tr turkish,pl polish,ca catalan,nl dutch,ar arabic,sv swedish,it italian,id indonesian,hi hindi,fi finnish,"
    "vi vietnamese,he hebrew,uk ukrainian,el greek,ms malay,cs czech,ro romanian,da danish,hu hungarian,ta tamil,"
    "no norwegian,th thai,ur urdu,hr croatian,bg bulgarian,lt lithuanian,la latin,mi maori,ml malayalam,cy welsh,"
    "sk slovak,te telugu,fa persian,lv latvian,bn bengali,sr serbian,az azerbaijani,sl slovenian,kn kannada,"
    "et estonian,mk macedonian,br breton,eu basque,is icelandic,hy armenian,ne nepali,mn mongolian,bs bosnian,"
    "kk kazakh,sq albanian,sw swahili,gl galician,mr marathi,pa punjabi,si sinhala,km khmer,sn shona,yo yoruba,"
    "so somali,af afrikaans,oc occitan,ka georgian,be belarusian,tg tajik,sd sindhi,gu gujarati,am amharic,"
    "yi yiddish,lo lao,uz uzbek,fo faroese,ht haitian creole,ps pashto,tk turkmen,nn nynorsk,mt maltese,"
    "sa sanskrit,lb luxembourgish,my myanmar,bo tibetan,tl tagalog,mg malagasy,as assamese,tt tatar,haw hawaiian,"
    "ln lingala,ha hausa,ba bashkir,jw javanese,su sundanese,yue cantonese"
)
LANGUAGE_NAMES: dict[str, str] = dict(item.split(" ", 1) for item in _LANGS.split(","))  # type: ignore[misc]


def check_format(response_format: str | None) -> str:
    fmt = (response_format or "json").lower()
    if fmt not in RESPONSE_FORMATS:
        raise InvalidRequest(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}",
                             param="response_format")
    return fmt


def needs_timestamps(response_format: str) -> bool:
    return response_format in ("srt", "vtt", "verbose_json")


def usage(t: Transcription) -> dict[str, Any]:
    """vLLM's transcription usage: billed audio seconds, rounded up."""
    return {"type": "duration", "seconds": int(math.ceil(t.duration))}


def _segments(t: Transcription) -> list[Segment]:
    # A transcription made without timestamps still gets one cue covering the clip.
    if t.segments:
        return t.segments
    return [Segment(0.0, t.duration, t.text)] if t.text else []


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t: Transcription) -> str:
    cues = [f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
            for i, s in enumerate(_segments(t), start=1)]
    return "\n".join(cues)


def to_vtt(t: Transcription) -> str:
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in _segments(t)]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_verbose_json(t: Transcription, *, task: str = "transcribe", temperature: float = 0.0) -> dict[str, Any]:
    return {
        "task": task,
        "language": LANGUAGE_NAMES.get(t.language or "", t.language or ""),
        "duration": round(t.duration, 3),
        "text": t.text,
        "segments": [
            {
                "id": i,
                "seek": int(round(s.start * 100)),
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": list(s.token_ids),
                "temperature": temperature,
                "avg_logprob": s.avg_logprob if s.avg_logprob is not None else 0.0,
                "compression_ratio": _compression_ratio(s.text),
                "no_speech_prob": s.no_speech_prob if s.no_speech_prob is not None else 0.0,
            }
            for i, s in enumerate(_segments(t))
        ],
        "usage": usage(t),
    }


def _compression_ratio(text: str) -> float:
    import zlib

    raw = text.encode("utf-8")
    return round(len(raw) / len(zlib.compress(raw)), 4) if raw else 0.0


def render(t: Transcription, response_format: str, *, task: str = "transcribe",
           temperature: float = 0.0) -> tuple[str | dict[str, Any], str]:
    """-> (body: dict for the JSON formats, str otherwise; content type)."""
    fmt = check_format(response_format)
    body: str | dict[str, Any]
    if fmt == "json":
        body = {"text": t.text, "usage": usage(t)}
    elif fmt == "verbose_json":
        body = to_verbose_json(t, task=task, temperature=temperature)
    elif fmt == "text":
        body = t.text + "\n"
    elif fmt == "srt":
        body = to_srt(t)
    else:
        body = to_vtt(t)
    return body, CONTENT_TYPES[fmt]
