#!/bin/sh
# After `pip install .`: make the installed worker's default LoRA folder LORAS_DIR (a volume), and make
# sure its built-in presets are there.
#
#   install-data.sh PYTHON DEFAULTS_SRC LORAS_DIR
#
# The worker has no LoRA-folder setting: it reads LoRAs from wan_engine.presets.BUILTIN_LORAS_DIR (in a
# wheel, wan_engine/_loras inside site-packages, holding only a README). This replaces that folder with a
# link to LORAS_DIR. It is left alone when it holds anything besides the README (an editable install's
# checkout loras/). The presets (BUILTIN_PRESETS_DIR) are copied from DEFAULTS_SRC only if the install
# has none (pyproject.toml ships them in the wheel; this covers a build that does not).
set -eu
python=$1
defaults_src=$2
loras_dir=$3

paths=$("$python" -c 'from wan_engine.presets import BUILTIN_LORAS_DIR as l, BUILTIN_PRESETS_DIR as p; print(p); print(l)')
presets_dir=$(printf '%s\n' "$paths" | sed -n 1p)
builtin_loras=$(printf '%s\n' "$paths" | sed -n 2p)

if ! ls "$presets_dir"/*.json >/dev/null 2>&1; then
    mkdir -p "$presets_dir"
    cp "$defaults_src"/*.json "$presets_dir"/
    echo "presets copied to $presets_dir"
fi

mkdir -p "$loras_dir"
if [ -L "$builtin_loras" ] || [ ! -e "$builtin_loras" ] \
    || [ -z "$(ls -A "$builtin_loras" | grep -v '^README.md$' || true)" ]; then
    rm -rf "$builtin_loras"
    ln -s "$loras_dir" "$builtin_loras"
    echo "loras: $builtin_loras -> $loras_dir"
else
    echo "loras: $builtin_loras holds files; left as it is"
fi
