# Object-store emulators for the tests, on loopback: Azurite (Azure Blob) and moto_server (S3).
# Sourced by scripts/test.sh:
#   source scripts/object-stores.sh; start_object_stores; trap stop_object_stores EXIT
# Installs what is missing (npm azurite, PyPI moto[server] and azure-storage-blob), starts both
# on free ports with their data in a temporary folder, creates the bucket and container
# `cairn-test`, and exports what the tests read: CAIRN_TEST_S3 and CAIRN_TEST_AZURE (vault URL
# roots) and the stores' usual environment variables (AWS_*, AZURE_*), as a user would set them.

OBJECT_STORES_DIR=""
# This file's folder, so that a script sourcing it from elsewhere finds object_stores.py.
OBJECT_STORES_SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OBJECT_STORE_PIDS=()

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_object_stores() {
    command -v azurite-blob >/dev/null || npm install -g --no-fund --no-audit azurite@3
    command -v moto_server >/dev/null || python3 -m pip install -q 'moto[server]'
    python3 -c 'import azure.storage.blob' 2>/dev/null || python3 -m pip install -q azure-storage-blob
    OBJECT_STORES_DIR=$(mktemp -d)
    local s3_port az_port
    s3_port=$(free_port)
    az_port=$(free_port)
    moto_server -H 127.0.0.1 -p "$s3_port" >"$OBJECT_STORES_DIR/moto.log" 2>&1 &
    OBJECT_STORE_PIDS+=($!)
    # --skipApiVersionCheck: object_store's Azure client may speak a newer API version than
    # this Azurite knows; --loose is not used, so unsupported headers still fail loudly.
    azurite-blob --blobHost 127.0.0.1 --blobPort "$az_port" --location "$OBJECT_STORES_DIR/azurite" \
        --silent --disableTelemetry --skipApiVersionCheck >"$OBJECT_STORES_DIR/azurite.log" 2>&1 &
    OBJECT_STORE_PIDS+=($!)
    python3 "$OBJECT_STORES_SCRIPTS/object_stores.py" "http://127.0.0.1:$s3_port" "http://127.0.0.1:$az_port" cairn-test
    export CAIRN_TEST_S3="s3://cairn-test"
    export AWS_ENDPOINT="http://127.0.0.1:$s3_port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
        AWS_ACCESS_KEY_ID=cairn AWS_SECRET_ACCESS_KEY=cairn-secret
    export CAIRN_TEST_AZURE="az://cairn-test"
    export AZURE_STORAGE_USE_EMULATOR=true AZURITE_BLOB_STORAGE_URL="http://127.0.0.1:$az_port"
    echo "moto_server on 127.0.0.1:$s3_port, azurite on 127.0.0.1:$az_port (logs in $OBJECT_STORES_DIR)"
}

stop_object_stores() {
    local pid
    for pid in "${OBJECT_STORE_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${OBJECT_STORE_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    OBJECT_STORE_PIDS=()
    [ -n "$OBJECT_STORES_DIR" ] && rm -rf "$OBJECT_STORES_DIR"
    OBJECT_STORES_DIR=""
}
