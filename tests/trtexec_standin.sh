#!/bin/sh
# TEST SCAFFOLDING - this is not TensorRT and builds nothing. It stands in for NVIDIA's trtexec
# on the loopback "device" of the SSH tests (tests/sshd_fixture.py), where no GPU exists. It
# prints trtexec's documented console format (the banner of samples/common/logging.h, the device
# block of sampleDevice.cpp, `TensorRT version:`, `Engine built in ... sec.` of sampleEngines.cpp;
# compare the public log excerpts in tests/test_trtexec.py) and writes the files trtexec writes:
# --saveEngine (a placeholder plan: TensorRT's 'ftrt' header tag and version bytes, then text),
# --timingCacheFile (loaded when present, written back; here one line is appended per build) and
# --exportTimes. Its TensorRT version code (100300 = 10.3.0) is read from the file
# trtexec_standin.version beside it; like that trtexec, it rejects the flags the version lacks.
here=$(dirname "$0")
code=$(cat "$here/trtexec_standin.version" 2>/dev/null || echo 100300)
major=$((code / 10000)); minor=$((code / 100 % 100)); patch=$((code % 100))
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v$code] [b30] # trtexec $*"
for arg in "$@"; do echo "$arg" >> "$here/trtexec_args.txt"; done

onnx=""; engine=""; cache=""; times=""
for arg in "$@"; do
  case "$arg" in
    --help) echo "=== Model Options ==="; echo "  --onnx=<file>  ONNX model"; exit 0;;
    --fp16|--int8|--best)
      if [ "$major" -ge 11 ]; then echo "[E] Unknown option: $arg" >&2; exit 1; fi;;
    --includeDataTransfers)
      if [ "$major" -lt 11 ]; then echo "[E] Unknown option: $arg" >&2; exit 1; fi;;
    --onnx=*) onnx="${arg#--onnx=}";;
    --saveEngine=*) engine="${arg#--saveEngine=}";;
    --timingCacheFile=*) cache="${arg#--timingCacheFile=}";;
    --exportTimes=*) times="${arg#--exportTimes=}";;
  esac
done
if [ ! -f "$onnx" ]; then echo "[E] Cannot find ONNX file: $onnx" >&2; exit 1; fi

stamp="[01/01/1970-03:47:30] [I]"
echo "$stamp === Device Information ==="
echo "$stamp Available Devices: "
echo "$stamp   Device 0: \"Orin\" UUID: GPU-f5507ee1-b6b1-556b-8350-83af993dbffd"
echo "$stamp Selected Device: Orin"
echo "$stamp Selected Device ID: 0"
echo "$stamp Compute Capability: 8.7"
echo "$stamp SMs: 8"
echo "$stamp TensorRT version: $major.$minor.$patch"

if [ -n "$engine" ]; then
  octal() { printf "\\$(printf %03o "$1")"; }
  {
    printf 'ftrt\000\000\000\000\000\000\000\000\000\000\000\000'
    printf '\000\000\000\000\000\000\000\000'
    octal "$major"; octal "$minor"; octal "$patch"; octal 30
    echo "stand-in engine for $(basename "$onnx")"
  } > "$engine"
  if [ -n "$cache" ]; then echo "stand-in tactics for $(basename "$onnx")" >> "$cache"; fi
  echo "$stamp Engine built in 0.5123 sec."
  echo "$stamp Created engine with size: 0.0001 MiB"
fi
if [ -n "$times" ]; then
  cat > "$times" <<'JSON'
[
  { "startComputeMs" : 1.0, "h2dMs" : 0.5, "computeMs" : 9.0, "d2hMs" : 0.5 },
  { "startComputeMs" : 20.0, "h2dMs" : 0.1, "computeMs" : 2.0, "d2hMs" : 0.2 },
  { "startComputeMs" : 23.0, "h2dMs" : 0.1, "computeMs" : 3.0, "d2hMs" : 0.2 }
]
JSON
fi
echo "&&&& PASSED TensorRT.trtexec [TensorRT v$code] [b30] # trtexec $*"
