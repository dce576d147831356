"""Pascal VOC XML annotations, parsed safely with lxml.

An annotation file is input from the internet, so the parser resolves no entities,
touches no network, loads no DTD and refuses huge trees. A document that declares a
DOCTYPE (the only way to define entities: XXE, "billion laughs") is rejected outright;
real VOC files never have one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lxml import etree

from data.cli import UserError

MAX_XML_BYTES = 1 << 20  # 1 MiB; a VOC file is about 1 KB per object


class AnnotationError(UserError):
    """A bad annotation file; the message names the file."""


@dataclass
class VocAnnotation:
    filename: str
    width: int          # as the XML says; 0 in some files of the fruit set
    height: int
    boxes: np.ndarray   # (N, 4) float32, xmin, ymin, xmax, ymax in pixels
    names: list[str]    # class name of each box


def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=False, remove_comments=True)


def parse_xml(path: str | os.PathLike) -> etree._Element:
    """Parse an untrusted XML file; reject DOCTYPEs, oversized and malformed files."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"annotation not found: {path}") from None
    if len(raw) > MAX_XML_BYTES:
        raise AnnotationError(f"{path}: {len(raw):,} bytes is too large for an annotation")
    if b"<!DOCTYPE" in raw.upper() or b"<!ENTITY" in raw.upper():
        raise AnnotationError(f"{path}: declares a DOCTYPE/ENTITY, refused (VOC files have none)")
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as exc:
        raise AnnotationError(f"{path}: malformed XML ({exc})") from None
    if root.getroottree().docinfo.internalDTD is not None:
        raise AnnotationError(f"{path}: declares a DTD, refused")
    return root


def _number(node: etree._Element, tag: str, path: Path) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise AnnotationError(f"{path}: <{tag}> is {text!r}, not a number") from None


def read_voc(path: str | os.PathLike) -> VocAnnotation:
    """Read one VOC annotation: image size and the boxes with their class names."""
    path = Path(path)
    root = parse_xml(path)
    if root.tag != "annotation":
        raise AnnotationError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    width = int(_number(size, "width", path)) if size is not None else 0
    height = int(_number(size, "height", path)) if size is not None else 0
    boxes, names = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            raise AnnotationError(f"{path}: an <object> lacks <name> or <bndbox>")
        coords = [_number(box, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")]
        if coords[2] <= coords[0] or coords[3] <= coords[1]:
            raise AnnotationError(f"{path}: empty box {coords} for '{name}'")
        boxes.append(coords)
        names.append(name)
    array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return VocAnnotation(root.findtext("filename") or "", width, height, array, names)
