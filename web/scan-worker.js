// The label reader's decoding, off the page's main thread: a 1280×720 frame takes ZXing about
// 70 ms on a laptop core with TRY_HARDER and several times that on a phone, which on the main
// thread would make the page stutter and its Stop button lag. A classic worker from the page's
// own origin (CSP: worker-src falls back to script-src 'self'), loading the vendored decoder.
//
// Messages in: {width, height, rgba} (a frame's RGBA pixels, transferred). Out: {ready: true}
// once the decoder is loaded, then {texts} per frame: what each family of readers found.

/* global ZXing */
importScripts('zxing.min.js');

const F = ZXing.BarcodeFormat;
const hints = new Map();
hints.set(ZXing.DecodeHintType.TRY_HARDER, true);
hints.set(ZXing.DecodeHintType.POSSIBLE_FORMATS, [F.CODE_128, F.CODE_39, F.CODE_93, F.ITF, F.CODABAR]);
// One family of readers each: a frame with several codes yields each family's find.
const families = [new ZXing.MultiFormatOneDReader(hints), new ZXing.QRCodeReader(), new ZXing.DataMatrixReader()];

function read(width, height, rgba) {
  const luminance = new Uint8ClampedArray(width * height);
  for (let i = 0, p = 0; i < luminance.length; i++, p += 4) {
    luminance[i] = (rgba[p] * 77 + rgba[p + 1] * 150 + rgba[p + 2] * 29) >> 8;
  }
  const bitmap = new ZXing.BinaryBitmap(new ZXing.HybridBinarizer(new ZXing.RGBLuminanceSource(luminance, width, height)));
  const texts = [];
  for (const reader of families) {
    try {
      texts.push(reader.decode(bitmap, hints).getText().trim());
    } catch (e) {
      // NotFound, Checksum or Format: this family sees no readable code in this frame.
    } finally {
      reader.reset();
    }
  }
  return texts;
}

self.onmessage = (event) => {
  const { width, height, rgba } = event.data;
  self.postMessage({ texts: read(width, height, new Uint8ClampedArray(rgba)) });
};
self.postMessage({ ready: true });
