#!/usr/bin/env bash
# Regenerates the TLS fixtures of the progress-endpoint tests (tests/data/tls/): a CA, a serving
# certificate it signs for localhost/127.0.0.1 and the chart's default Service name, and a second,
# unrelated CA (the "wrong CA" tests). Test-only keys: never use them anywhere else.
# Valid for 100 years so the committed files do not expire under the tests.
set -euo pipefail
dir="$(cd "$(dirname "$0")/.." && pwd)/tests/data/tls"
mkdir -p "$dir"
cd "$dir"
days=36500
ca() { # name, subject
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=$2" -keyout "$1.key" -out "$1.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}
ca ca "dinoflow test CA"
ca other-ca "unrelated test CA"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=dinoflow-operator" \
  -keyout server.key -out server.csr 2>/dev/null
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -out server.crt \
  -extfile <(printf '%s\n' \
    "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:dinoflow-operator.dinoflow-system.svc" \
    "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth") 2>/dev/null
# other.key: a key that matches no certificate here (the key-mismatch test).
mv other-ca.key other.key
rm -f server.csr ca.srl ca.key
echo "wrote $dir"
