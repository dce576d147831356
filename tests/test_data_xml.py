"""VOC XML parsing: real shapes, quirks, and hostile documents."""

from __future__ import annotations

import time

import numpy as np
import pytest

from data.voc import AnnotationError, read_voc

GOOD = """<annotation><filename>apple_1.jpg</filename>
<size><width>0</width><height>0</height><depth>3</depth></size>
<object><name>apple</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>
<object><name>banana</name><bndbox><xmin>1.5</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40.5</ymax></bndbox></object>
</annotation>"""


def write(tmp_path, text, name="a.xml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_boxes_names_and_zero_size(tmp_path):
    annotation = read_voc(write(tmp_path, GOOD))
    assert annotation.names == ["apple", "banana"]
    np.testing.assert_allclose(annotation.boxes, [[10, 20, 50, 60], [1.5, 2, 30, 40.5]])
    assert (annotation.width, annotation.height) == (0, 0)  # the loader takes the image's size


def test_xxe_external_entity_is_rejected(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xxe = (f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file://{secret}">]>'
           "<annotation><filename>&xxe;</filename></annotation>")
    with pytest.raises(AnnotationError, match="DOCTYPE") as info:
        read_voc(write(tmp_path, xxe))
    assert "TOP-SECRET" not in str(info.value)


def test_billion_laughs_is_rejected_quickly(tmp_path):
    entities = '<!ENTITY lol "lol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
    bomb = f'<?xml version="1.0"?><!DOCTYPE lolz [{entities}]><annotation><filename>&lol9;</filename></annotation>'
    start = time.monotonic()
    with pytest.raises(AnnotationError):
        read_voc(write(tmp_path, bomb))
    assert time.monotonic() - start < 1.0


def test_malformed_xml_names_the_file(tmp_path):
    path = write(tmp_path, "<annotation><object>", name="broken_7.xml")
    with pytest.raises(AnnotationError, match=r"broken_7.xml"):
        read_voc(path)


def test_non_numeric_coordinate(tmp_path):
    with pytest.raises(AnnotationError, match="xmin"):
        read_voc(write(tmp_path, GOOD.replace("<xmin>10</xmin>", "<xmin>ten</xmin>")))


def test_empty_box_and_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match="empty box"):
        read_voc(write(tmp_path, GOOD.replace("<xmax>50</xmax>", "<xmax>5</xmax>")))
    with pytest.raises(AnnotationError, match="not found"):
        read_voc(tmp_path / "nope.xml")


def test_oversized_file_is_refused(tmp_path):
    huge = "<annotation>" + "<x/>" * 300_000 + "</annotation>"
    with pytest.raises(AnnotationError, match="too large"):
        read_voc(write(tmp_path, huge))
