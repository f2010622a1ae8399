#!/usr/bin/env bash
# The image round trip a firmware engineer does first: keygen -> sign -> verify -> info -> package.
# Runs in ./demo-out on a sample payload and prints every command before running it.
set -euo pipefail
out=${1:-demo-out}
rm -rf "$out"
mkdir -p "$out"
cd "$out"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

# A sample "application": 64 KiB of deterministic bytes, and a smaller secure image.
python3 -c "import random; r=random.Random(1); open('app.bin','wb').write(bytes(r.getrandbits(8) for _ in range(65536)))"
python3 -c "import random; r=random.Random(2); open('spe.bin','wb').write(bytes(r.getrandbits(8) for _ in range(16384)))"
echo "sample payloads: $out/app.bin (64 KiB), $out/spe.bin (16 KiB)"

step otakit keygen -t ecdsa-p256 -o signing-key.pem
step otakit getpub -k signing-key.pem -l c
step otakit sign --key signing-key.pem --version 1.1.0+42 --header-size 0x400 --pad-header \
    --align 8 --slot-size 0xe6000 --security-counter auto app.bin app-v1.1.0.img
step otakit sign --key signing-key.pem --version 1.1.0 --pad-header spe.bin spe-v1.1.0.img
step otakit verify --key signing-key.pem app-v1.1.0.img
step otakit info app-v1.1.0.img
step otakit package -o update-v1.1.0.tar --version 1.1.0 app-v1.1.0.img --spe spe-v1.1.0.img
step otakit info update-v1.1.0.tar
step otakit unpack update-v1.1.0.tar -C unpacked
step ls -l unpacked

# A tampered copy must fail verification with a named error and exit status 1.
python3 -c "d=bytearray(open('app-v1.1.0.img','rb').read()); d[5000]^=1; open('tampered.img','wb').write(d)"
printf '\n\033[1m$ otakit verify --key signing-key.pem tampered.img   # expected to fail\033[0m\n'
if otakit verify --key signing-key.pem tampered.img; then
    echo "demo: the tampered image verified; this is a bug" >&2
    exit 1
fi

# A simulated PSoC 6 device: install v1.2.0, pull the plug mid-swap, boot again, confirm.
step otakit sign --key signing-key.pem --version 1.2.0 --header-size 0x400 --pad-header \
    --align 8 --security-counter auto app.bin app-v1.2.0.img
step otakit sim create device --image app-v1.1.0.img --key signing-key.pem --serial DEMO-1
step otakit sim install device app-v1.2.0.img
step otakit sim boot device --power-cut-after 150 --tear
step otakit sim status device
step otakit sim boot device
step otakit sim confirm device
step otakit sim status device

printf '\nDone: keys, signed images, the package and a simulated device are in %s/\n' "$PWD"
