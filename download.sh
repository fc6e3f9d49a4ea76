#!/usr/bin/env bash
# Download Llama 2 with the signed URL from Meta's email (the same files and folders as Meta's
# download.sh). Each file goes to NAME.part, resumes after an interruption (wget -c or curl -C -)
# only while the server reports the same file (ETag/Last-Modified), stops on a stall, an overall
# deadline or more bytes than the file can have, is checked (its announced size, an HTML/XML
# error page instead of the file, md5 from Meta's checklists with md5sum on Linux or md5 -r on
# macOS) and only then renamed to NAME. Signed URLs are never printed.
#   TARGET_FOLDER=/data/llama ./download.sh      (DOWNLOADER=curl to prefer curl over wget)
# `llama download` does the same in Python.

set -euo pipefail

NEW_URL="request a new URL at https://llama.meta.com/llama-downloads and run this script again"
TARGET_FOLDER="${TARGET_FOLDER:-.}"
ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"

die() { echo "error: $*" >&2; exit 1; }

read -r -p "Enter the URL from email: " PRESIGNED_URL
echo ""
read -r -p "Enter the list of models to download without spaces ($ALL_MODELS), or press Enter for all: " MODEL_SIZE
[[ "$PRESIGNED_URL" == *"*"* ]] || die "the URL has no '*' in it; paste the whole URL from Meta's email"
MODEL_SIZE="${MODEL_SIZE:-$ALL_MODELS}"

DOWNLOADER="${DOWNLOADER:-}"
if [[ -z "$DOWNLOADER" ]]; then
    if command -v wget >/dev/null 2>&1; then DOWNLOADER=wget
    elif command -v curl >/dev/null 2>&1; then DOWNLOADER=curl
    else die "neither wget nor curl is installed; install one (or use: llama download)"; fi
fi
if command -v md5sum >/dev/null 2>&1; then
    md5_of() { md5sum "$1" | cut -d' ' -f1; }
elif command -v md5 >/dev/null 2>&1; then
    md5_of() { md5 -r "$1" | cut -d' ' -f1; }  # macOS: -r prints "HASH FILE" like md5sum
else
    die "neither md5sum nor md5 is installed, so downloads cannot be verified"
fi

# Limits, as in llama/fetch.py: a stall (fewer than STALL_BYTES in STALL_SECONDS), an overall
# deadline, and a byte cap where the server does not announce the size.
STALL_SECONDS="${STALL_SECONDS:-120}"
STALL_BYTES="${STALL_BYTES:-65536}"
DEADLINE_SECONDS="${DEADLINE_SECONDS:-86400}"
MAX_BYTES="${MAX_BYTES:-68719476736}"
SMALL_FILE_BYTES=16777216

size_of() { if [[ -f "$1" ]]; then wc -c < "$1" | tr -d ' '; else echo 0; fi; }

# probe URL: "STATUS LENGTH VALIDATOR TYPE" from a HEAD request (fields "-" when the server gives none).
probe() {
    local headers
    if [[ "$DOWNLOADER" == wget ]]; then
        headers="$(wget -q -S --spider "$1" 2>&1 || true)"
    else
        headers="$(curl -sSI "$1" 2>/dev/null || true)"
    fi
    headers="$(printf '%s\n' "$headers" | tr -d '\r' | sed 's/^ *//')"
    local status length validator type
    status="$(printf '%s\n' "$headers" | awk '$1 ~ /^HTTP\// {v = $2} END {print (v == "" ? "-" : v)}')"
    if [[ "$status" != 2* ]]; then  # no answer to HEAD to go by (some servers refuse it): GET decides
        echo "$status - - -"; return
    fi
    length="$(printf '%s\n' "$headers" | awk 'tolower($1) == "content-length:" {v = $2} END {print (v == "" ? "-" : v)}')"
    validator="$(printf '%s\n' "$headers" | awk 'tolower($1) == "etag:" {sub(/^[^:]*: */, ""); v = $0}
        tolower($1) == "last-modified:" && v == "" {sub(/^[^:]*: */, ""); v = $0} END {print (v == "" ? "-" : v)}')"
    type="$(printf '%s\n' "$headers" | awk 'tolower($1) == "content-type:" {v = tolower($2)} END {print (v == "" ? "-" : v)}')"
    echo "$status $length ${validator// /_} $type"
}

# watch PID PART CAP: stop the download PID if PART stalls, outgrows CAP or runs past the deadline.
watch() {
    local pid="$1" part="$2" cap="$3" start=$SECONDS window=$SECONDS had
    had="$(size_of "$part")"
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        local now=$SECONDS size
        size="$(size_of "$part")"
        if (( size > cap )); then kill "$pid" 2>/dev/null; echo cap; return; fi
        if (( now - start > DEADLINE_SECONDS )); then kill "$pid" 2>/dev/null; echo deadline; return; fi
        if (( now - window >= STALL_SECONDS )); then
            if (( size - had < STALL_BYTES )); then kill "$pid" 2>/dev/null; echo stall; return; fi
            window=$now; had=$size
        fi
    done
    echo ok
}

# fetch PATH [CHECKLIST]: download ${TARGET_FOLDER}/PATH, verified against CHECKLIST when given.
fetch() {
    local path="$1" checklist="${2:-}" dest="$TARGET_FOLDER/$1" url="${PRESIGNED_URL/'*'/$1}"
    local name expected=""
    name="$(basename "$path")"
    if [[ -n "$checklist" ]]; then
        expected="$(awk -v f="$name" '$2 == f || $2 == "*" f {print tolower($1)}' "$checklist")"
        [[ -n "$expected" ]] || echo "warning: $checklist has no md5 for $name; it is not verified" >&2
    fi
    if [[ -f "$dest" ]]; then
        if [[ -z "$checklist" || "$(md5_of "$dest")" == "$expected" ]]; then
            echo "$dest is already there"; return 0
        fi
        echo "$dest does not match its md5; downloading it again"
        rm -f "$dest"
    fi
    mkdir -p "$(dirname "$dest")"
    local status length validator type
    read -r status length validator type <<< "$(probe "$url")"
    if [[ "$status" == 401 || "$status" == 403 ]]; then
        die "the server refused $path (HTTP $status: the URL has expired or was not copied whole); $NEW_URL"
    fi
    if [[ "$type" == *html* ]]; then  # the .part, if any, stays as it is
        die "the server sent a web page instead of $path (the URL has probably expired); $NEW_URL"
    fi
    # Resume only a .part of the same file: the server's ETag/Last-Modified as when it began.
    if [[ -f "$dest.part" && ( "$validator" == "-" || "$(cat "$dest.part.validator" 2>/dev/null)" != "$validator" ) ]]; then
        echo "$path changed on the server (or cannot be checked) since the partial download; starting over"
        rm -f "$dest.part"
    fi
    echo "$validator" > "$dest.part.validator"
    local cap="$MAX_BYTES"
    [[ "$name" == *.chk || "$name" == *.json || "$name" == *.md || "$name" == LICENSE ]] && cap=$SMALL_FILE_BYTES
    [[ "$length" != "-" ]] && cap="$length"
    echo "Downloading $path"
    local rc=0 pid verdict
    if [[ "$(size_of "$dest.part")" -ge "$cap" && "$length" != "-" ]]; then
        rc=0; verdict=ok  # nothing left to fetch; the size is checked below
    else
        if [[ "$DOWNLOADER" == wget ]]; then
            wget --continue -q --show-progress --read-timeout="$STALL_SECONDS" -O "$dest.part" "$url" &
        else
            curl -sS --fail --location --continue-at - --progress-bar \
                --speed-limit "$(( STALL_BYTES / STALL_SECONDS + 1 ))" --speed-time "$STALL_SECONDS" \
                -o "$dest.part" "$url" &
        fi
        pid=$!
        verdict="$(watch "$pid" "$dest.part" "$cap")"
        wait "$pid" || rc=$?
    fi
    case "$verdict" in
        cap) rm -f "$dest.part" "$dest.part.validator"
             die "the server sent more than the $cap bytes $path can have; the download was deleted, check the URL" ;;
        deadline) die "$path did not finish within $DEADLINE_SECONDS s; run this script again to resume" ;;
        stall) die "the download of $path stalled; run this script again to resume" ;;
    esac
    if [[ $rc -ne 0 ]]; then
        # wget exits 8 and curl 22 on an HTTP error: for a signed URL almost always 403 Forbidden.
        if [[ ($DOWNLOADER == wget && $rc -eq 8) || ($DOWNLOADER == curl && $rc -eq 22) ]]; then
            [[ -s "$dest.part" ]] || rm -f "$dest.part" "$dest.part.validator"
            die "the server refused $path (HTTP error, usually 403: the URL has expired or was not copied whole); $NEW_URL"
        fi
        die "the download of $path stopped ($DOWNLOADER exit $rc); run this script again to resume"
    fi
    local got
    got="$(size_of "$dest.part")"
    if [[ "$length" != "-" && "$got" -ne "$length" ]]; then
        (( got > length )) && rm -f "$dest.part" "$dest.part.validator"
        die "$path has $got of its $length bytes; run this script again to resume"
    fi
    if head -c 512 "$dest.part" | LC_ALL=C grep -qiE '<!doctype html|<html|<\?xml'; then
        rm -f "$dest.part" "$dest.part.validator"  # the file holds the error page alone
        die "the server sent an error page instead of $path (the URL has probably expired); $NEW_URL"
    fi
    if [[ -n "$expected" ]]; then
        local actual
        actual="$(md5_of "$dest.part")"
        if [[ "$actual" != "$expected" ]]; then
            rm -f "$dest.part" "$dest.part.validator"
            die "$path: md5 mismatch (expected $expected, got $actual); the download was deleted, run again"
        fi
    fi
    mv -f "$dest.part" "$dest"
    rm -f "$dest.part.validator"
}

# checklist PATH: download a fresh md5 checklist (an old one may be an error page) and check it.
checklist() {
    rm -f "$TARGET_FOLDER/$1"
    fetch "$1"
    grep -qE '^[0-9a-fA-F]{32} ' "$TARGET_FOLDER/$1" || {
        rm -f "$TARGET_FOLDER/$1"; die "$1 has no md5 lines (probably an error page); $NEW_URL"; }
}

mkdir -p "$TARGET_FOLDER"
fetch LICENSE
fetch USE_POLICY.md
checklist tokenizer_checklist.chk
fetch tokenizer.model "$TARGET_FOLDER/tokenizer_checklist.chk"

for m in ${MODEL_SIZE//,/ }; do
    case "$m" in
        7B) SHARD=0; MODEL_PATH="llama-2-7b" ;;
        7B-chat) SHARD=0; MODEL_PATH="llama-2-7b-chat" ;;
        13B) SHARD=1; MODEL_PATH="llama-2-13b" ;;
        13B-chat) SHARD=1; MODEL_PATH="llama-2-13b-chat" ;;
        70B) SHARD=7; MODEL_PATH="llama-2-70b" ;;
        70B-chat) SHARD=7; MODEL_PATH="llama-2-70b-chat" ;;
        *) die "unknown model $m; choose among $ALL_MODELS" ;;
    esac
    echo "Downloading $MODEL_PATH"
    checklist "$MODEL_PATH/checklist.chk"
    for s in $(seq 0 "$SHARD"); do
        fetch "$MODEL_PATH/consolidated.$(printf '%02d' "$s").pth" "$TARGET_FOLDER/$MODEL_PATH/checklist.chk"
    done
    fetch "$MODEL_PATH/params.json" "$TARGET_FOLDER/$MODEL_PATH/checklist.chk"
    echo "$m: verified in $TARGET_FOLDER/$MODEL_PATH"
done
