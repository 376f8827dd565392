// The label reader's decoding, off the page's main thread: a 1280×720 frame takes ZXing about
// 110 ms on a laptop core (TRY_HARDER, read upright and turned) and several times that on a phone, which on the main
// thread would make the page stutter and its Stop button lag. A classic worker from the page's
// own origin (CSP: worker-src falls back to script-src 'self'), loading the vendored decoder.
//
// Messages in: {width, height, rgba} (a frame's RGBA pixels, transferred). Out: {ready: true}
// once the decoder is loaded, then {texts} per frame: what each family of readers found.
//
// A phone held upright over a label lying flat sees its barcodes on end: the 1D readers read
// each frame as it is and turned a quarter (ZXing turns only canvas-backed images, and a
// worker has none). QR and Data Matrix codes read in any orientation.

/* global ZXing */
importScripts('zxing.min.js');

const F = ZXing.BarcodeFormat;
const hints = new Map();
hints.set(ZXing.DecodeHintType.TRY_HARDER, true);
hints.set(ZXing.DecodeHintType.POSSIBLE_FORMATS, [F.CODE_128, F.CODE_39, F.CODE_93, F.ITF, F.CODABAR]);
const oneD = new ZXing.MultiFormatOneDReader(hints);
const twoD = [new ZXing.QRCodeReader(), new ZXing.DataMatrixReader()];

function bitmap(luminance, width, height) {
  return new ZXing.BinaryBitmap(new ZXing.HybridBinarizer(new ZXing.RGBLuminanceSource(luminance, width, height)));
}

/** The frame turned a quarter (transposed: the 1D readers try each row both ways). */
function turned(luminance, width, height) {
  const out = new Uint8ClampedArray(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) out[x * height + y] = luminance[y * width + x];
  }
  return out;
}

/** One reader's find in one image, if any. */
function find(reader, image) {
  try {
    return reader.decode(image, hints).getText().trim();
  } catch (e) {
    return undefined; // NotFound, Checksum or Format: no readable code of this family here
  } finally {
    reader.reset();
  }
}

/** Every code one frame yields: a frame with several codes yields each reader's find. */
function read(width, height, rgba) {
  const luminance = new Uint8ClampedArray(width * height);
  for (let i = 0, p = 0; i < luminance.length; i++, p += 4) {
    luminance[i] = (rgba[p] * 77 + rgba[p + 1] * 150 + rgba[p + 2] * 29) >> 8;
  }
  const upright = bitmap(luminance, width, height);
  const found = [
    find(oneD, upright),
    find(oneD, bitmap(turned(luminance, width, height), height, width)),
    ...twoD.map((reader) => find(reader, upright)),
  ];
  return found.filter(Boolean);
}

self.onmessage = (event) => {
  const { width, height, rgba } = event.data;
  self.postMessage({ texts: read(width, height, new Uint8ClampedArray(rgba)) });
};
self.postMessage({ ready: true });
