#!/bin/sh
# Rebuilds plotly.min.js beside this script: plotly.js with only the trace types the report draws (scatter, bar,
# heatmap; contour for Optuna's contour plot, whose other plots are scatter and bar), 1.3 MB instead of the full
# bundle's 4.8 MB. Needs node and npm (and the network, once, for npm); the report itself never fetches anything.
# Run it when plotly.js is to be updated:
#   sh fer_tune/report/plotlyjs/build.sh [VERSION]     (default: the version below)
# The report's tests check that every trace type its figures use is in the bundle.
set -eu
VERSION=${1:-4.1.1}
TRACES="bar heatmap contour"   # scatter is in plotly.js's core
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm init -y >/dev/null
npm install --ignore-scripts --no-audit --no-fund "plotly.js@$VERSION" esbuild@0.28 esbuild-plugin-environment@0.5 \
    esbuild-plugin-glsl@1.4 esbuild-plugin-inline-css@0.0.1 stream-browserify@3 >/dev/null
{
    echo "var Plotly = require('plotly.js/lib/core');"
    echo "Plotly.register(["
    for t in $TRACES; do echo "    require('plotly.js/lib/$t'),"; done
    echo "]);"
    echo "module.exports = Plotly;"
} >entry.js
# plotly.js's own esbuild settings (its repository's tasks are not in the npm package: their one import replaced)
sed -e "s#require('./tasks/util/constants.js')#{pathToRoot: '.'}#" node_modules/plotly.js/esbuild-config.js >config.js
cat >build.js <<JS
const { esbuildConfig } = require('./config.js');
require('esbuild').build({
    ...esbuildConfig,
    entryPoints: ['entry.js'],
    outfile: '$here/plotly.min.js',
    minify: true,
    legalComments: 'eof',
    logLevel: 'warning',
    banner: { js: '/**\n* plotly.js v$VERSION: a bundle of the trace types scatter $TRACES\n'
        + '* Copyright 2012-2026, Plotly, Inc.\n* All rights reserved.\n* Licensed under the MIT license (LICENSE beside this file)\n*/' },
}).catch(() => process.exit(1));
JS
node build.js
cp node_modules/plotly.js/LICENSE "$here/LICENSE"
echo "wrote $here/plotly.min.js ($(wc -c <"$here/plotly.min.js") bytes)"
