"""MQTT with Sparkplug B: the host application (`driver: mqtt`), the edge node, the codec, a broker of our own."""

from vbatt.drivers.mqtt.config import MqttDriverConfig, MqttNodeConfig, mqtt_nodes
from vbatt.drivers.registry import DriverSpec


def _check(cfg, fleet) -> None:
    seen: dict[tuple[str, str, str], str] = {}
    for i, key in mqtt_nodes(cfg, fleet).items():
        if key in seen:
            raise ValueError(f"node {fleet.ids[i]}: group/edge node/device {'/'.join(key)} is also node {seen[key]}")
        seen[key] = fleet.ids[i]
    d = cfg.drivers.mqtt
    if seen and not d.secured:
        raise ValueError("say how to secure the broker link: 'tls: {ca: ...}' or 'plaintext: true' (loopback only)")


# a template with `driver: mqtt` is served by `vbatt fleet CONFIG` as Sparkplug edge nodes (drivers.mqtt.fleet)
SPEC = DriverSpec(driver="vbatt.drivers.mqtt.driver:MqttDriver", config=MqttDriverConfig, node=MqttNodeConfig,
                  check=_check, template=True)
