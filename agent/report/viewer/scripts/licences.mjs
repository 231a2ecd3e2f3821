// Writes ../static/THIRD_PARTY_LICENSES.txt: the licence of every package bundled into viewer.min.js.
import { readFileSync, writeFileSync } from "node:fs";

const bundled = ["three"]; // esbuild's dependencies are build tools, not bundled
const parts = bundled.map((name) => {
  const pkg = JSON.parse(readFileSync(`node_modules/${name}/package.json`, "utf8"));
  const licence = readFileSync(`node_modules/${name}/LICENSE`, "utf8").trim();
  return `${name} ${pkg.version} (${pkg.license}) ${pkg.homepage || ""}\n\n${licence}\n`;
});
const header = "Third-party software bundled into viewer.min.js (agent/report/viewer, built with esbuild).\n\n";
writeFileSync("../static/THIRD_PARTY_LICENSES.txt", header + parts.join("\n" + "-".repeat(78) + "\n\n"));
