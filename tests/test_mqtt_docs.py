"""docs/mqtt.md's metrics table is the one the code derives from the field table."""

from __future__ import annotations

from conftest import REPO
from vbatt.drivers.mqtt.sparkplug import DEVICE_METRICS, metrics_table
from vbatt.kernel.fields import NODE_MEASUREMENTS, NODE_OUTPUTS


def test_the_metrics_table_in_the_docs_is_the_derived_one():
    text = (REPO / "docs" / "mqtt.md").read_text()
    block = text.split("<!-- metrics:begin -->\n", 1)[1].split("<!-- metrics:end -->", 1)[0]
    assert block == metrics_table(), "docs/mqtt.md: regenerate the table with sparkplug.metrics_table()"


def test_every_wire_field_is_a_metric_with_its_unit():
    by_name = {m.name: m for m in DEVICE_METRICS}
    for f in NODE_MEASUREMENTS:
        assert by_name[f.name].unit == f.unit and by_name[f.name].field == f.name
    for f in NODE_OUTPUTS:
        assert by_name["instruction/" + f.name].field == f.name
