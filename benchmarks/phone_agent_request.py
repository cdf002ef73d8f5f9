"""The Open-AutoGLM-style phone-agent request: system prompt, 1080x2400 screenshots, 4 steps of history.

Open-AutoGLM (phone_agent/agent.py) sends per step: the system prompt, the history (earlier user turns with their
screenshots *removed*, earlier assistant turns `<think>..</think><answer>do(..)</answer>`), then a user turn with the
new screenshot first and the screen info text after it; `max_tokens` 3000, temperature 0, streaming. Only the latest
screenshot is ever in the prompt, so each step has one new image and the prefix up to the previous user turn repeats.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image, ImageDraw

SYSTEM_PROMPT = """You are a phone-operating agent. You see the current screenshot of an Android phone and the user's \
task, and you decide the single next action that moves the task forward. Think step by step about what is on the \
screen, then output exactly one action.

Output format:
<think>{your reasoning about the current screen and the next step}</think>
<answer>{exactly one action from the list below}</answer>

Coordinates are relative: the top-left corner of the screen is (0,0) and the bottom-right corner is (999,999), \
whatever the real resolution of the screenshot is.

Available actions:
- do(action="Launch", app="xxx")
  Open an installed app by its name. Use this instead of searching the home screen when you know the app.
- do(action="Tap", element=[x,y])
  Tap the point (x,y). Aim at the centre of the button, text field or list item you mean.
- do(action="Tap", element=[x,y], message="important operation")
  The same tap, but it confirms a payment, a deletion or a message being sent: the user is asked first.
- do(action="Type", text="xxx")
  Type text into the focused input field. Tap the field first if it is not focused; existing text is replaced.
- do(action="Swipe", start=[x1,y1], end=[x2,y2])
  Swipe from (x1,y1) to (x2,y2): scroll lists, turn pages, pull down the notification shade.
- do(action="Long Press", element=[x,y])
  Press and hold: context menus, selecting text, moving icons.
- do(action="Double Tap", element=[x,y])
  Two quick taps: zoom into a map or a picture.
- do(action="Back")
  The system back button: close a dialog, leave a page, hide the keyboard.
- do(action="Home")
  Go to the home screen.
- do(action="Wait", duration="x seconds")
  Wait for a page to load when the screen shows a spinner or a blank page.
- do(action="Take_over", message="xxx")
  Hand control to the user for a login, a captcha or anything you must not do yourself.
- finish(message="xxx")
  The task is complete (or impossible); the message tells the user the result.

Rules:
1. Before anything else, check that the app in the foreground is the one the task needs. If it is not, Launch it.
2. If you land on an unrelated page, press Back. If Back does not help, go Home and Launch the app again.
3. If a page has not loaded yet, Wait at most three times in a row, then go Back and try another way.
4. If what you look for is not on the screen, Swipe to scroll. After three swipes without progress, change the
   search words or the way you navigate.
5. Never repeat the same action more than twice on an unchanged screen: look for why it failed.
6. When a search box is needed, Tap it first, then Type, then Tap the search button (or the keyboard's enter key).
7. For shopping or food orders: check shop name, item, size, quantity and price before the final confirmation,
   and mark the final tap with message="important operation".
8. Do not share personal data, do not accept permissions the task does not need, close pop-up adverts with the X.
9. When a list has many similar items, prefer the one whose title matches the task words most closely.
10. For messages, check that the contact name at the top of the chat matches before you Type.
11. When the task asks for information (a price, a time, an address), read it from the screen and finish with it.
12. Finish as soon as the task is done: do not open extra pages to double-check unless the task asks for it.

Example:
<think>The screen shows the home screen; the task needs the weather app, so I open it directly.</think>
<answer>do(action="Launch", app="Weather")</answer>
"""

TASK = "Open the Shopping app, search for wireless earbuds under 50 dollars and add the best-rated pair to the cart."
SCREEN_APPS = ["Launcher", "Shopping", "Shopping", "Shopping"]
# The assistant turns put back into the history (random weights produce noise, so the history is scripted the way
# a real model answers; the timing does not depend on the words, only on their length).
ACTIONS = [
    '<think>The home screen is open; the task needs the Shopping app.</think>'
    '<answer>do(action="Launch", app="Shopping")</answer>',
    '<think>The Shopping app is open on its front page; the search bar is at the top.</think>'
    '<answer>do(action="Tap", element=[500,96])</answer>',
    '<think>The search field is focused and the keyboard is up.</think>'
    '<answer>do(action="Type", text="wireless earbuds under 50")</answer>',
    '<think>Results are listed; the second item has the best rating.</think>'
    '<answer>do(action="Tap", element=[520,610])</answer>',
]
WIDTH, HEIGHT = 1080, 2400


def screenshot(step: int) -> bytes:
    """A fake app screen as PNG bytes: status bar, a header, a search bar, list rows with text, a nav bar."""
    img = Image.new("RGB", (WIDTH, HEIGHT), (246, 246, 248))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, WIDTH, 80], fill=(20, 20, 24))
    d.text((30, 25), f"12:{30 + step:02d}   4G   87%", fill=(255, 255, 255))
    hue = [(230, 80, 40), (40, 110, 220), (40, 160, 90), (150, 60, 200)][step % 4]
    d.rectangle([0, 80, WIDTH, 260], fill=hue)
    d.text((40, 140), f"{SCREEN_APPS[step % 4]} - step {step + 1}", fill=(255, 255, 255))
    d.rounded_rectangle([40, 290, WIDTH - 40, 390], radius=40, fill=(255, 255, 255), outline=(200, 200, 200))
    d.text((90, 330), "Search wireless earbuds, phones, chargers ...", fill=(120, 120, 120))
    for row in range(9):
        y = 430 + row * 210
        d.rounded_rectangle([40, y, WIDTH - 40, y + 190], radius=20, fill=(255, 255, 255))
        d.rectangle([70, y + 25, 210, y + 165], fill=((row * 37 + step * 50) % 255, 120, (row * 91) % 255))
        d.text((240, y + 40), f"Item {row + 1 + 9 * step}: Wireless earbuds model X{row}{step}", fill=(10, 10, 10))
        d.text((240, y + 90), f"${19 + row * 7}.99   rating {3.5 + (row % 3) * 0.5:.1f}   free delivery",
               fill=(90, 90, 90))  # fmt: skip
    d.rectangle([0, HEIGHT - 140, WIDTH, HEIGHT], fill=(255, 255, 255))
    for i, label in enumerate(("Home", "Categories", "Cart", "Me")):
        d.text((90 + i * 260, HEIGHT - 90), label, fill=(60, 60, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image_part(png: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def _screen_info(step: int) -> str:
    return json.dumps({"current_app": SCREEN_APPS[step % 4]}, ensure_ascii=False)


def conversation(step: int, shots: list[bytes]) -> list[dict[str, Any]]:
    """Messages for step `step` (0-based): history without images, then the new screenshot + screen info."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for k in range(step + 1):
        text = f"{TASK}\n\n{_screen_info(k)}" if k == 0 else f"** Screen Info **\n\n{_screen_info(k)}"
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if k == step:
            content.insert(0, _image_part(shots[k]))  # only the newest user turn keeps its screenshot
        msgs.append({"role": "user", "content": content})
        if k < step:
            msgs.append({"role": "assistant", "content": ACTIONS[k]})
    return msgs


def corpus() -> list[str]:
    """Text the benchmark tokenizer is trained on (so the prompt tokenizes at a realistic chars/token)."""
    lines = [*SYSTEM_PROMPT.splitlines(), TASK, *ACTIONS, *(_screen_info(k) for k in range(4))]
    return lines * 4
