#!/usr/bin/env bash
# Set up (idempotent) and run the demo: the bundled IDRiD sample as a project in ./demo_project,
# opened in napari with the lesion workspace docked. With no display (a server, CI), it runs
# under Xvfb, trains a short model, saves a screenshot of the whole window and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
  exec .venv/bin/python examples/demo.py --project demo_project "$@"
else
  echo "demo: no display found; running under Xvfb and saving demo_screenshot.png"
  exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python examples/demo.py \
    --project demo_project --screenshot demo_screenshot.png "$@"
fi
