#!/usr/bin/env bash
# Placeholder until the native library lands.
exit 0
