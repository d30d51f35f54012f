"""chat.py's input: lines from a terminal, with Python's readline (line editing, the Up arrow's history, and
bracketed paste, so a pasted block of several lines arrives whole as one message), or from a pipe. Either way:

- a block of several lines can also be sent between two lines of three double quotes (`\"\"\"`), typed or piped;
- input that is not UTF-8 text is named and skipped, never fed to the model, and the conversation goes on;
- nothing is cut: a terminal's line limit (4096 bytes in canonical mode) does not apply while readline reads.
"""

from __future__ import annotations

import sys

from lightning_moe.config.schema import ConfigError

BLOCK = '"""'


def check_open(stdin) -> None:
    """A closed input (`chat.py 0<&-`) is refused in one line. Torch-free, so chat.py checks it before it loads
    the model (or even imports torch): a closed stdin is known at start-up, no reason to wait for the weights."""
    if stdin is None or stdin.closed:
        raise ConfigError("stdin: chat.py reads the conversation from its input, which is closed; run it in a "
                          "terminal or pipe text into it (echo \"...\" | python chat.py run=...)")


class Skipped(str):
    """A line that could not be decoded; its text says what was skipped."""


class ChatInput:
    def __init__(self, stdin=None, stdout=None):
        self.stdin, self.stdout = stdin or sys.stdin, stdout or sys.stdout
        self.interactive = self.stdin.isatty()
        self.line_no = 0
        if self.interactive:
            import readline  # noqa: F401  (importing it is what gives input() editing and history)

            readline.parse_and_bind("set enable-bracketed-paste on")

    def _line(self, prompt: str) -> str | None:
        """One line without its newline; None at end of input. KeyboardInterrupt passes through."""
        self.line_no += 1
        if self.interactive:
            try:
                line = input(prompt)
                line.encode("utf-8")  # a terminal's undecodable bytes arrive as surrogates (surrogateescape)
                return line
            except EOFError:
                return None
            except (UnicodeDecodeError, UnicodeEncodeError):
                return Skipped("(that input is not UTF-8 text: skipped; the conversation goes on)")
        raw = self.stdin.buffer.readline() if hasattr(self.stdin, "buffer") else self.stdin.readline().encode()
        if not raw:
            return None
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            return Skipped(f"(input line {self.line_no} is not UTF-8 text (byte {raw[e.start]:#04x} at {e.start}): "
                           "skipped; the conversation goes on)")

    def message(self, prompt: str = "you> ") -> str | None:
        """The next message (a line, or a block between two \"\"\" lines); None at end of input."""
        line = self._line(prompt)
        if line is None or isinstance(line, Skipped) or line.strip() != BLOCK:
            return line
        lines = []
        while (line := self._line("... ")) is not None and line.strip() != BLOCK:
            if isinstance(line, Skipped):
                return line
            lines.append(line)
        return "\n".join(lines)
