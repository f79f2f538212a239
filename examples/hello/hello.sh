#!/bin/sh
echo "hello from a custody image"
