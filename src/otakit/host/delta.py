"""``otakit delta ...``: delta patches between two images, as files: create, apply, show.

The server makes the deltas it offers itself; these commands are for users who want the files
(to ship them another way, or to see what a change costs on the wire). The format and its
checks are :mod:`otakit.image.delta`'s.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from otakit.files import write_atomic
from otakit.image.delta import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    apply_delta,
    check_delta,
    create_delta,
)

app = typer.Typer(
    help="Delta patches between two images: create, apply, show.", no_args_is_help=True
)
out = Console(highlight=False, soft_wrap=True)

BaseArgument = Annotated[
    Path,
    typer.Argument(metavar="BASE", help="The image the patch starts from.", show_default=False),
]


@app.command("create")
def create(
    base: BaseArgument,
    new: Annotated[
        Path,
        typer.Argument(metavar="NEW", help="The image the patch makes.", show_default=False),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Where to write the patch.", show_default=False)
    ],
    compression: Annotated[
        str,
        typer.Option(
            "--compression",
            metavar="NAME",
            help=f"{', '.join(COMPRESSIONS)}: lzma makes the smallest patches, heatshrink "
            "needs the least device memory.",
        ),
    ] = DEFAULT_COMPRESSION,
    whole_files: Annotated[
        bool,
        typer.Option(
            "--whole-files",
            help="Diff the files whole, not as MCUboot images (header to the end of the TLVs).",
        ),
    ] = False,
) -> None:
    """Write the patch that turns BASE into NEW; print its size next to NEW's."""
    patch = create_delta(base, new, compression=compression, whole_files=whole_files)
    write_atomic(output, patch)
    header = check_delta(patch)
    ratio = header.new_size / len(patch) if patch else 0.0
    out.print(
        f"{output}: {len(patch)} bytes ({compression}) for a {header.new_size}-byte image, "
        f"{ratio:.1f}x smaller; applies only to base SHA-256 {header.base_sha256.hex()}",
        markup=False,
    )


@app.command("apply")
def apply(
    base: BaseArgument,
    patch: Annotated[
        Path, typer.Argument(metavar="PATCH", help="The patch to apply.", show_default=False)
    ],
    output: Annotated[
        Path,
        typer.Option("-o", "--output", help="Where to write the new image.", show_default=False),
    ],
) -> None:
    """Apply PATCH to BASE and write the new image (checked: base, patch and result hashes).

    Exit 1 when the patch is for another base, corrupt or truncated.
    """
    result = _Buffer()
    header = apply_delta(base, patch, result)
    write_atomic(output, bytes(result.data))
    out.print(
        f"{output}: {header.new_size} bytes, SHA-256 {hashlib.sha256(result.data).hexdigest()}",
        markup=False,
    )


@app.command("show")
def show(
    patch: Annotated[
        Path, typer.Argument(metavar="PATCH", help="The patch to describe.", show_default=False)
    ],
) -> None:
    """Check a patch's digest and print what it is for."""
    header = check_delta(patch)
    out.print(f"{patch}: otakit delta, {header.size} bytes, {header.compression}", markup=False)
    out.print(f"  base: {header.base_size} bytes, SHA-256 {header.base_sha256.hex()}", markup=False)
    out.print(f"  new:  {header.new_size} bytes, SHA-256 {header.new_sha256.hex()}", markup=False)


class _Buffer:
    """The result in memory (an image: a few MiB at most), written out once it checked."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, offset: int, data: bytes) -> None:
        del self.data[offset:]
        self.data += data
