"""The fleet dashboard and `strongroom status`: a read-only consumer of the fleet's signed results.

Layers: `view` (pure model of the fleet built from messages) and `queries` (pure reading of it:
rows, pages, summary, device detail), shared by both front ends; `feed` (the MQTT edge, with a
read-only dashboard identity) and `home_watch` (registry and audit log of the fleet home) feed a
`live` view; `web` (the ASGI app and its `static` page), `terminal` (rich tables), `cli` (the two
commands).
"""
