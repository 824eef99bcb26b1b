// BentoML's swagger-initializer.js, but with no online validator: Swagger UI's default shows a badge loaded
// from validator.swagger.io, which would send it the address of this page.
window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "./docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout",
    requestInterceptor: leaveOutEmptyFields,
  });
};

// "Try it out" sends every field of a form, an empty text for each one left blank (and for a list of photos
// with none added). The API refuses empty fields (400: "leave the field out"), so the page leaves them out, as
// a client would.
function leaveOutEmptyFields(request) {
  if (request.body instanceof FormData) {
    const kept = new FormData();
    for (const [name, value] of request.body.entries()) {
      if (value !== "") kept.append(name, value);
    }
    request.body = kept;
  }
  return request;
}
