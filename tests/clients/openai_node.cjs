// The official OpenAI Node SDK against the appliance: every case the client matrix checks, one JSON
// object on stdout. Usage: node openai_node.cjs BASE_URL MODEL AUDIO_FILE (the SDK is resolved from
// $CLIENT_MODULES/node_modules, where the tests install it).
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const { createRequire } = require("node:module");

const OpenAI = createRequire(path.join(process.env.CLIENT_MODULES, "package.json"))("openai");
const [baseURL, model, audio] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const file = () => fs.createReadStream(audio);

async function errorOf(call) {
  try {
    await call();
    return null;
  } catch (error) {
    return { status: error.status, code: error.code, type: error.type, message: error.message };
  }
}

async function main() {
  const manifest = path.join(process.env.CLIENT_MODULES, "node_modules", "openai", "package.json");
  const results = { sdk_version: JSON.parse(fs.readFileSync(manifest, "utf8")).version };
  results.json = await client.audio.transcriptions.create({ model, file: file() });
  for (const format of ["text", "srt", "vtt"]) {
    results[format] = await client.audio.transcriptions.create({ model, file: file(), response_format: format });
  }
  results.verbose_json = await client.audio.transcriptions.create({
    model, file: file(), response_format: "verbose_json", timestamp_granularities: ["segment"],
  });
  const events = [];
  const stream = await client.audio.transcriptions.create({ model, file: file(), stream: true });
  for await (const event of stream) events.push(event);
  results.stream = events;
  const listed = await client.models.list();
  results.models = listed.data.map((m) => m.id);
  results.retrieved = (await client.models.retrieve(listed.data[0].id)).id;
  results.error = await errorOf(() => client.audio.transcriptions.create({ model: "gpt-4o-transcribe", file: file() }));
  process.stdout.write(JSON.stringify(results));
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
